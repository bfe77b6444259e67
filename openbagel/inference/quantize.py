"""Weight-only quantisation, applied from outside the model (the modules stay pure).

    from openbagel.inference.quantize import quantize
    quantize(pipe.engine.model, "int8")          # any device: int8 weights + per-channel scales
    BagelPipeline.from_pretrained(path, device="cuda", dtype="bf16", quantize="bnb-nf4")   # load quantised

Modes:
  int8          ours (gpt-fast's WeightOnlyInt8Linear): symmetric per-output-channel int8; the forward
                dequantises the weight to the activation dtype and runs the ordinary matmul (on CPU a
                cache-sized block of rows at a time). Resident weights shrink 4x from fp32 (2x from bf16).
  int4          ours: symmetric int4 in groups of 64 inputs with a bf16 scale per group, two weights a
                byte (4.5 bits a weight with the kernel's zero points): about half of int8's memory (on
                CPU the 7B holds 9.7 GiB and runs in a 12 GiB memory cgroup). On x86 CPUs a few input
                rows (a generated token) run through PyTorch's int4 kernel in bf16, 0.6x int8's time a
                token on AVX2; more rows, and other CPUs, dequantise blocks of rows as int8 does.
  torchao-int8  torchao `Int8WeightOnlyConfig` (CUDA; needs `pip install openbagel[quant]`).
  torchao-int4  torchao `Int4WeightOnlyConfig` (CUDA, bf16 model).
  torchao-fp8   torchao `Float8DynamicActivationFloat8WeightConfig`, per row: float8 weights (one scale per
                output channel) and activations (one scale per token), matmuls on fp8 tensor cores
                (CUDA, compute capability 8.9+: Ada, Hopper). The one mode that is faster, not only smaller.
  bnb-int8      bitsandbytes `Linear8bitLt` (CUDA; needs bitsandbytes).
  bnb-nf4       bitsandbytes `Linear4bit` NF4 (CUDA; needs bitsandbytes).

By default every `nn.Linear` of the language model is quantised (the MoT experts and lm_head hold
almost all the weights); pass `include` to choose others by qualified name. Our modes (int8, int4) also
store the two largest parts left in int8, in both modes: the language model's token embedding, with a
scale per row (545 M entries in the 7B, 2.2 GB in fp32), and the ViT's Linear layers (397 M weights,
1.6 GB; int8 rather than int4 because every answer about an image reads them). With `device`, a model that
sits in CPU memory is quantised on its way there, one layer at a time, so the device never holds more
than one full-precision layer: how a 7B checkpoint loads onto a GPU too small for it in bf16.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import release_file_pages

# (linear, device, dtype) -> its quantised replacement on device; dtype (or None: the weight's) is
# the dtype of what stays in floating point (scales, bias) and of the activations
Factory = Callable[[nn.Linear, torch.device, "torch.dtype | None"], nn.Module]

MODES = ("int8", "int4", "torchao-int8", "torchao-int4", "torchao-fp8", "bnb-int8", "bnb-nf4")


def language_model_linears(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("language_model.")


def vision_linears(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("vit_model.")


def token_embedding(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and name == "language_model.model.embed_tokens"


def int8_extras(name: str, module: nn.Module) -> bool:
    """What our modes store in int8 besides the selected layers: the token embedding and the ViT's Linears."""
    return vision_linears(name, module) or token_embedding(name, module)


# The CPU blocks of the quantised layers, in weight elements (fp32 buffer: 4 MiB / 16 MiB). Measured on the
# 7B's 18,944 x 3,584 and 3,584 x 18,944 weights (2 threads): the small block is fastest up to a few hundred
# input rows, the large one from 512 (int8, 3,584 x 18,944 at 512 rows: 638 ms against 1,052 ms).
BLOCK_ELEMENTS, BLOCK_ELEMENTS_LARGE, BLOCK_LARGE_FROM = 2**20, 2**22, 512
# Input rows from which int4 dequantises blocks instead of calling the CPU int4 kernel. On the 7B's
# 18,944 x 3,584 weight (2 threads), kernel against blocks: 1 row 5.4 / 47 ms, 8 rows 14 / 62, 32 rows
# 53 / 81, 64 rows 104 / 116, 128 rows 206 / 170, 512 rows 845 / 510.
INT4_KERNEL_BELOW = 96
INT4_GROUP = 64
INT4_LANES = 16  # Int4Linear's layout packs output rows in blocks of 2 x this (2 x 32 on AVX-512 CPUs)
WEIGHT_BYTES = {"int8": 1.0, "int4": 0.5 + 4 / INT4_GROUP}  # bytes a Linear weight takes in our modes
# (int4: a (scale, zero) pair of bf16 per group, the CPU kernel's form; the zeros are 0)


def int4_group(out_features: int, in_features: int, subject: str) -> int:
    """The int4 group size for a layer of this shape, or a ValueError naming `subject`."""
    group = math.gcd(in_features, INT4_GROUP)
    if group % 2 or out_features % (2 * INT4_LANES):
        raise ValueError(f"int4 packs inputs in pairs and outputs in blocks of {2 * INT4_LANES}: {subject} "
                         f"{in_features} inputs and {out_features} outputs; quantise it with int8, or leave it "
                         "out with `include`")
    return group


_WORKSPACES = threading.local()


def workspace(name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU buffer of `shape` that this thread reuses for every call of every quantised layer.

    Fresh block buffers per call cost page faults: at the 7B's 200 Linear calls a token, with glibc's default
    malloc handing back and re-faulting them, int4 decoding ran 4x slower under memory pressure (a 16 GiB
    memory cgroup). One buffer per thread (at most 16 MiB + 2 MiB) is kept instead; threads never share one.
    """
    buffers = vars(_WORKSPACES).setdefault("buffers", {})  # this thread's own dict
    key, numel = (name, dtype), shape[0] * shape[1]
    if key not in buffers or buffers[key].numel() < numel:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference_mode
            buffers[key] = torch.empty(numel, dtype=dtype, device="cpu")
    return buffers[key][:numel].view(shape)


QUANTIZE_ELEMENTS = 2**24  # weights quantised per block: 64 MiB in fp32, whatever the layer's size


def row_blocks(weight: torch.Tensor, device: torch.device | None,
               multiple: int = 1) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(a, b, rows [a, b) of `weight` in fp32 on `device`), a bounded block (of `multiple`s of rows) at a time.

    Quantising a whole weight at once made up to three fp32 temporaries of its size: for the 7B's lm_head
    (545 M weights, 2.2 GB in fp32) about 6.5 GB on top of the model, while it loaded.
    """
    step = max(1, QUANTIZE_ELEMENTS // max(1, math.prod(weight.shape[1:])) // multiple) * multiple
    for a in range(0, weight.shape[0], step):
        b = min(a + step, weight.shape[0])
        yield a, b, weight[a:b].to(device, torch.float32, copy=True)  # a copy: callers work on it in place


def int8_rows(weight: torch.Tensor, device: torch.device | None,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale (in `dtype`) per row: (int8 rows, scales)."""
    device = device or weight.device
    q = torch.empty(weight.shape, dtype=torch.int8, device=device)
    scales = torch.empty(weight.shape[0], dtype=dtype, device=device)
    for a, b, w in row_blocks(weight, device):
        scales[a:b] = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        # round against the stored scale (bf16 rounds it by up to 0.4%), not the exact one
        q[a:b] = w.div_(scales[a:b, None].float()).round_().clamp_(-127, 127)
    return q, scales


def _bias(linear: nn.Linear, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(device, dtype)


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W).T + b for integer weights; subclasses say how rows dequantise.

    `_dequantize_rows` writes rows [a, b) of the weight in the activation dtype, `_output_scales` gives the
    per-output-channel scales that are cheaper to apply to the output than to the weight (or None).
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features or weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def _dequantize_rows(self, out: torch.Tensor, a: int, b: int, scratch: torch.Tensor | None = None) -> None:
        """Rows [a, b) of the weight into `out`; `scratch` (from `_scratch`) holds intermediates."""
        raise NotImplementedError

    def _scratch(self, rows: int) -> torch.Tensor | None:
        """Working memory for `_dequantize_rows` of up to `rows` rows (from this thread's workspace)."""
        return None

    def _output_scales(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    def _block_rows(self, rows: int) -> int:
        """The rows of a dequantised block, near `rows` (a layout may need a multiple of something)."""
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self._output_scales(x.dtype)
        if x.device.type == "cpu" and not (x.requires_grad or torch.compiler.is_compiling()
                                           or torch.is_autocast_enabled("cpu")):
            y = self._blockwise(x)
            if scales is not None:
                y.mul_(scales)
        else:
            w = x.new_empty(self.out_features, self.in_features)
            self._dequantize_rows(w, 0, self.out_features)
            y = F.linear(x, w) if scales is None else F.linear(x, w) * scales
        return y if self.bias is None else y + self.bias

    def _blockwise(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dequant(W).T a block of output rows at a time, each dequantised into one reused buffer.

        Dequantising the whole weight writes it out in full precision and reads it back on every call: at
        the 7B's widths that made a token's int8 matmul 6-11x slower than fp32, while the blocked form is
        faster than fp32 there (it reads a quarter of the bytes). From BLOCK_LARGE_FROM rows of input the
        blocks grow, or a wide-input weight (the 7B's down projection) would run as many thin matmuls.
        """
        flat = x.reshape(-1, self.in_features)
        elements = BLOCK_ELEMENTS_LARGE if flat.shape[0] >= BLOCK_LARGE_FROM else BLOCK_ELEMENTS
        rows = self._block_rows(max(1, elements // self.in_features))
        out = flat.new_empty(flat.shape[0], self.out_features)
        buffer = workspace("block", (min(rows, self.out_features), self.in_features), flat.dtype)
        scratch = self._scratch(buffer.shape[0])
        for a in range(0, self.out_features, rows):
            b = min(a + rows, self.out_features)
            w = buffer[:b - a]
            self._dequantize_rows(w, a, b, scratch)
            torch.mm(flat, w.T, out=out[:, a:b])
        return out.view(*x.shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    """int8 weight [out, in] and one fp scale per output channel (applied to the output)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> "Int8Linear":
        """Scales and bias in `dtype` (default: the weight's)."""
        dtype = dtype or linear.weight.dtype
        q, scales = int8_rows(linear.weight.detach(), device, dtype)
        return cls(q, scales, _bias(linear, device, dtype), linear.in_features)

    def _dequantize_rows(self, out: torch.Tensor, a: int, b: int, scratch: torch.Tensor | None = None) -> None:
        out.copy_(self.weight[a:b])

    def _output_scales(self, dtype: torch.dtype) -> torch.Tensor:
        return self.scales.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(QuantizedLinear):
    """int4 weights in groups of `group_size` inputs, one bf16 scale per group, two weights a byte, laid
    out as PyTorch's CPU int4 matmul (`aten._weight_int4pack_mm_for_cpu`) takes them on this machine.

    Output rows go in blocks of 2·H (H = `lanes`: 16 where PyTorch runs its AVX2 kernel, 32 for AVX-512):
    byte (block, k, e) holds row 2H·block + e of input k in its low nibble and row 2H·block + H + e in its
    high one, as level + 8 (levels -8..7, scale = absmax / 7.5: the step is smaller than with absmax / 7,
    and the clipped +8 costs no more than rounding does). `scales` is [in / group, out, 2] in bf16:
    (scale, 0), the kernel's (scale, zero) pairs. A few input rows (a generated token) run through that
    kernel in bf16, 8.7x faster than dequantising on the 7B's widths; more rows, other devices, and CPUs
    whose kernel reads another layout (checked once by `cpu_int4_kernel`) dequantise blocks of rows.
    """

    KERNEL_GROUPS = (32, 64)  # the group sizes int4_group gives that the CPU kernel takes

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, lanes: int) -> None:
        super().__init__(weight, scales, bias, in_features)
        self.lanes = lanes

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None,
                    dtype: torch.dtype | None = None, *, lanes: int | None = None) -> "Int4Linear":
        """Bias in `dtype` (default: the weight's); scales are bf16; `lanes` default: this CPU's kernel's."""
        weight = linear.weight.detach()
        n, k = weight.shape
        group, device = int4_group(n, k, "a Linear with"), device or weight.device
        lanes = lanes or int4_lanes(n)
        packed = torch.empty(n // (2 * lanes), k, lanes, dtype=torch.uint8, device=device)
        scales = torch.zeros(k // group, n, 2, dtype=torch.bfloat16, device=device)
        for a, b, w in row_blocks(weight, device, multiple=2 * lanes):
            w = w.view(b - a, k // group, group)
            # bf16 rounds to nearest; 1 + 2^-8 keeps each scale at or above absmax / 7.5, so |w| / scale <= 7.5
            s = (w.abs().amax(dim=2).clamp_min(1e-12) * ((1 + 2**-8) / 7.5)).to(torch.bfloat16)
            u = w.div_(s.float()[..., None]).round_().clamp_(-8, 7).add_(8).to(torch.uint8).view(-1, 2, lanes, k)
            packed[a // (2 * lanes):b // (2 * lanes)] = (u[:, 0] | (u[:, 1] << 4)).transpose(1, 2)
            scales[:, a:b, 0] = s.T
        return cls(packed.view(n, k // 2), scales, _bias(linear, device, dtype or weight.dtype), k, lanes)

    def _scratch(self, rows: int) -> torch.Tensor:
        return workspace("nibbles", (rows, self.in_features // 2), torch.uint8)

    def _block_rows(self, rows: int) -> int:
        return max(1, rows // (2 * self.lanes)) * 2 * self.lanes

    def _dequantize_rows(self, out: torch.Tensor, a: int, b: int, scratch: torch.Tensor | None = None) -> None:
        """Rows [a, b), whole blocks, unpacked through `scratch`, not temporaries (see `workspace`)."""
        k, lanes = self.in_features, self.lanes
        blocks = (b - a) // (2 * lanes)
        packed = self.weight.view(-1, k, lanes)[a // (2 * lanes):b // (2 * lanes)]
        nibbles = scratch if scratch is not None else self.weight.new_empty(b - a, k // 2)
        nibbles = nibbles[:b - a].view(blocks, k, lanes)
        halves = out.view(blocks, 2, lanes, k)
        halves[:, 0].copy_(torch.bitwise_and(packed, 15, out=nibbles).transpose(1, 2))
        halves[:, 1].copy_(torch.bitwise_right_shift(packed, 4, out=nibbles).transpose(1, 2))
        out.sub_(8).view(b - a, -1, self.group_size).mul_(self.scales[:, a:b, 0].T[..., None].to(out.dtype))

    def _blockwise(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if (flat.shape[0] >= INT4_KERNEL_BELOW or self.group_size not in self.KERNEL_GROUPS
                or not cpu_int4_kernel(self.lanes)):
            return super()._blockwise(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16).contiguous(), self.weight,
                                                        self.group_size, self.scales.to(torch.bfloat16))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 in groups of {self.group_size}")


def int4_lanes(out_features: int) -> int:
    """H of Int4Linear's layout: what PyTorch's CPU int4 kernel reads on this machine (AVX-512: 32, else 16)."""
    wide = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and out_features % (4 * INT4_LANES) == 0
    return 2 * INT4_LANES if wide else INT4_LANES


@functools.cache
def cpu_int4_kernel(lanes: int) -> bool:
    """Whether this PyTorch's CPU int4 matmul exists and reads Int4Linear's layout of `lanes` (checked once,
    on a probe of several groups and blocks); if not, int4 dequantises every call, and says so once."""
    works = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if works:
        generator = torch.Generator().manual_seed(0)  # the global RNG is the user's
        weight = torch.randn(4 * lanes, 256, generator=generator, device="cpu")
        probe = nn.utils.skip_init(nn.Linear, 256, 4 * lanes, bias=False, device="cpu")
        with torch.no_grad():
            probe.weight.copy_(weight)
        q = Int4Linear.from_linear(probe, torch.device("cpu"), lanes=lanes)
        x = torch.randn(3, 256, generator=generator, device="cpu").bfloat16()
        with torch.inference_mode():
            w = torch.empty(4 * lanes, 256, device="cpu")
            q._dequantize_rows(w, 0, 4 * lanes)
            try:
                got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.weight, q.group_size, q.scales).float()
            except RuntimeError:
                got = None
        want = x.float() @ w.T
        works = got is not None and bool(
            torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))
    if not works:
        warnings.warn(f"int4: this PyTorch's CPU int4 kernel does not read our layout here (CPU capability "
                      f"{torch.backends.cpu.get_cpu_capability()}); generated tokens dequantise instead, "
                      "several times slower", RuntimeWarning, stacklevel=2)
    return works


class Int8Embedding(nn.Module):
    """An embedding table in int8 with one scale per row; looked-up rows come back in the scales' dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> "Int8Embedding":
        """The same rows and scales as Int8Linear's: an embedding is a weight indexed instead of multiplied."""
        return cls(*int8_rows(embedding.weight.detach(), device, dtype or embedding.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scales.dtype) * self.scales[ids, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def check_mode(mode: str, device: torch.device | str | None = None) -> None:
    """A clear error for an unknown mode, or for fp8 on a device without fp8 tensor cores."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "torchao-fp8" and device is not None:
        device = torch.device(device)
        if not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)):
            raise ValueError(f"torchao-fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper), "
                             f"not {device}; int8 (any device) or torchao-int8 (CUDA) shrink the weights instead")


def quantize(model: nn.Module, mode: str = "int8",
             include: Callable[[str, nn.Module], bool] = language_model_linears,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None,
             extras: bool = True) -> nn.Module:
    """Replace the selected Linear layers in place; returns the model. In our modes (int8, int4) the token
    embedding and the ViT's Linear layers are stored in int8 too, unless `extras=False`. With `device`,
    the whole model moves there: each selected layer is moved and quantised in turn, then the remaining
    tensors follow.

    With `dtype`, what stays in floating point comes out in it: our modes quantise each weight from the
    file's dtype a block of rows at a time and keep scales and bias in `dtype`, the CUDA libraries get
    each layer cast just before they quantise it, and the other floating tensors are cast after. So a
    model still in its file's dtype (memory-mapped by `load_checkpoint(dtype=None)`) never holds more
    than one layer in `dtype`: that is how the 7B loads on CPU in less memory than its fp32 (59 GB) or
    bf16 (29 GB) weights.
    """
    target = None if device is None else torch.device(device)
    check_mode(mode, target or next(model.parameters()).device)
    from .onednn import PackedLinear  # lazy: onednn builds on replace_modules below

    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("this model's Linear layers are packed for oneDNN (the CPU fp32 default); load it with "
                         "BagelPipeline.from_pretrained(..., quantize=MODE) or pack=False, then quantise")
    if mode.startswith("torchao"):
        make = _torchao_factory(mode)
    elif mode.startswith("bnb"):
        make = _bnb_factory(mode)
    else:
        make = Int4Linear.from_linear if mode == "int4" else Int8Linear.from_linear

    def convert(linear: nn.Linear, make: Factory = make) -> nn.Module:
        source = linear.weight.data
        quantized = make(linear, target or linear.weight.device, dtype)
        # A mapped window of the checkpoint lives until every tensor in it is replaced, at the end of this
        # function; until then the pages read from it would stay in RSS (most of the 29 GB file for the 7B).
        release_file_pages(source)
        return quantized

    if mode == "int4":  # check every layer first: never leave a half-converted model behind
        for name, module in model.named_modules():
            if include(name, module):
                int4_group(module.out_features, module.in_features, f"{name} has")
    names = replace_modules(model, include, convert)
    if extras and mode in ("int8", "int4"):
        names += replace_modules(model, int8_extras, lambda m: convert(
            m, Int8Embedding.from_embedding if isinstance(m, nn.Embedding) else Int8Linear.from_linear))
    if target is not None or dtype is not None:
        from accelerate.utils import set_module_tensor_to_device

        quantized = set(names)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.rpartition(".")[0] not in quantized:
                cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                set_module_tensor_to_device(model, name, target or tensor.device, value=tensor.data, dtype=cast)
    return model


def replace_modules(model: nn.Module, include: Callable[[str, nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Swap every selected layer for make(layer), in place; returns the qualified names swapped."""
    names = [name for name, m in model.named_modules() if include(name, m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return names


def _torchao_factory(mode: str) -> Factory:
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                          Int8WeightOnlyConfig, PerRow, quantize_)
    except ImportError:
        raise ImportError(f"{mode} needs torchao: pip install 'openbagel[quant]'") from None
    config = {"torchao-int8": Int8WeightOnlyConfig, "torchao-int4": Int4WeightOnlyConfig,
              "torchao-fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}[mode]()

    def make(linear: nn.Linear, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
        holder = nn.Sequential(linear.to(device, dtype))  # quantize_ swaps children of the module it is given
        quantize_(holder, config)
        return holder[0]

    return make


def _bnb_factory(mode: str) -> Factory:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"{mode} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes") from None

    def make(linear: nn.Linear, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
        if dtype is not None:
            linear.to(dtype)
        with torch.device("meta"):  # no throw-away init of a full-size weight per layer
            if mode == "bnb-int8":
                new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                          has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                        compute_dtype=linear.weight.dtype, quant_type="nf4")
        if mode == "bnb-int8":  # bitsandbytes quantises Int8Params on the move from CPU to the GPU
            new.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        else:  # Params4bit quantises on its first move to a device, wherever its data is
            new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return new.to(device)

    return make


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (what quantisation shrinks)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
