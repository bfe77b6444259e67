"""Weight-only quantisation, applied from outside the model (the modules stay pure).

    from openbagel.inference.quantize import quantize
    quantize(pipe.engine.model, "int8")          # any device: int8 weights + per-channel scales
    BagelPipeline.from_pretrained(path, device="cuda", dtype="bf16", quantize="bnb-nf4")   # load quantised

Modes:
  int8          ours (gpt-fast's WeightOnlyInt8Linear): symmetric per-output-channel int8; the forward
                dequantises the weight to the activation dtype and runs the ordinary matmul (on CPU a
                cache-sized block of rows at a time). Resident weights shrink 4x from fp32 (2x from bf16).
  torchao-int8  torchao `Int8WeightOnlyConfig` (CUDA; needs `pip install openbagel[quant]`).
  torchao-int4  torchao `Int4WeightOnlyConfig` (CUDA, bf16 model).
  torchao-fp8   torchao `Float8DynamicActivationFloat8WeightConfig`, per row: float8 weights (one scale per
                output channel) and activations (one scale per token), matmuls on fp8 tensor cores
                (CUDA, compute capability 8.9+: Ada, Hopper). The one mode that is faster, not only smaller.
  bnb-int8      bitsandbytes `Linear8bitLt` (CUDA; needs bitsandbytes).
  bnb-nf4       bitsandbytes `Linear4bit` NF4 (CUDA; needs bitsandbytes).

By default every `nn.Linear` of the language model is quantised (the MoT experts and lm_head hold
almost all the weights); pass `include` to choose others by qualified name. With `device`, a model that
sits in CPU memory is quantised on its way there, one layer at a time, so the device never holds more
than one full-precision layer: how a 7B checkpoint loads onto a GPU too small for it in bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "torchao-int8", "torchao-int4", "torchao-fp8", "bnb-int8", "bnb-nf4")


def language_model_linears(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("language_model.")


# Int8Linear's CPU blocks, in weight elements (fp32 buffer: 4 MiB / 16 MiB). Measured on the 7B's
# 18,944 x 3,584 and 3,584 x 18,944 weights (2 threads): the small block is fastest up to a few hundred
# input rows, the large one from 512 (3,584 x 18,944 at 512 rows: 638 ms against 1,052 ms).
BLOCK_ELEMENTS, BLOCK_ELEMENTS_LARGE, BLOCK_LARGE_FROM = 2**20, 2**22, 512


class Int8Linear(nn.Module):
    """y = (x @ dequant(W).T) + b with W int8 [out, in] and one fp scale per output channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None) -> "Int8Linear":
        w = linear.weight.detach().to(device).float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(q, scales.to(linear.weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not (x.requires_grad or torch.compiler.is_compiling()
                                           or torch.is_autocast_enabled("cpu")):
            y = self._blockwise(x)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _blockwise(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dequant(W).T a block of output rows at a time, each dequantised into one reused buffer.

        Dequantising the whole weight writes it out in full precision and reads it back on every call: at
        the 7B's widths that made a token's matmul 6-11x slower than fp32, while the blocked form is faster
        than fp32 there (it reads a quarter of the bytes). From BLOCK_LARGE_FROM rows of input the blocks
        grow, or a wide-input weight (the 7B's down projection) would run as many thin matmuls.
        """
        flat = x.reshape(-1, self.in_features)
        elements = BLOCK_ELEMENTS_LARGE if flat.shape[0] >= BLOCK_LARGE_FROM else BLOCK_ELEMENTS
        rows = max(1, elements // self.in_features)
        out = flat.new_empty(flat.shape[0], self.out_features)
        buffer = flat.new_empty(min(rows, self.out_features), self.in_features)
        for a in range(0, self.out_features, rows):
            w = buffer[:min(rows, self.out_features - a)]
            w.copy_(self.weight[a:a + rows])
            torch.mm(flat, w.T, out=out[:, a:a + rows])
        return out.mul_(self.scales.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


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
             device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the selected Linear layers in place; returns the model. With `device`, the whole model moves
    there: each selected layer is moved and quantised in turn, then the remaining tensors follow.

    With `dtype`, each selected layer is cast to it just before it is quantised, and the other floating
    tensors after: a model still in its file's dtype (memory-mapped by `load_checkpoint(dtype=None)`)
    never holds more than one layer in `dtype`. That is how the 7B loads on CPU in less memory than its
    fp32 (59 GB) or bf16 (29 GB) weights.
    """
    target = None if device is None else torch.device(device)
    check_mode(mode, target or next(model.parameters()).device)
    from .onednn import PackedLinear  # lazy: onednn builds on replace_linears below

    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("this model's Linear layers are packed for oneDNN (the CPU fp32 default); load it with "
                         "BagelPipeline.from_pretrained(..., quantize=MODE) or pack=False, then quantise")
    if mode.startswith("torchao"):
        make = _torchao_factory(mode)
    elif mode.startswith("bnb"):
        make = _bnb_factory(mode)
    else:
        make = Int8Linear.from_linear

    def convert(linear: nn.Linear) -> nn.Module:
        if dtype is not None:
            linear.to(dtype)
        return make(linear, target or linear.weight.device)

    names = replace_linears(model, include, convert)
    if target is not None or dtype is not None:
        from accelerate.utils import set_module_tensor_to_device

        quantized = set(names)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.rpartition(".")[0] not in quantized:
                cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                set_module_tensor_to_device(model, name, target or tensor.device, value=tensor.data, dtype=cast)
    return model


def replace_linears(model: nn.Module, include: Callable[[str, nn.Module], bool],
                    make: Callable[[nn.Linear], nn.Module]) -> list[str]:
    """Swap every selected layer for make(layer), in place; returns the qualified names swapped."""
    names = [name for name, m in model.named_modules() if include(name, m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return names


def _torchao_factory(mode: str) -> Callable[[nn.Linear, torch.device], nn.Module]:
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                          Int8WeightOnlyConfig, PerRow, quantize_)
    except ImportError:
        raise ImportError(f"{mode} needs torchao: pip install 'openbagel[quant]'") from None
    config = {"torchao-int8": Int8WeightOnlyConfig, "torchao-int4": Int4WeightOnlyConfig,
              "torchao-fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}[mode]()

    def make(linear: nn.Linear, device: torch.device) -> nn.Module:
        holder = nn.Sequential(linear.to(device))  # quantize_ swaps children of the module it is given
        quantize_(holder, config)
        return holder[0]

    return make


def _bnb_factory(mode: str) -> Callable[[nn.Linear, torch.device], nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"{mode} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes") from None

    def make(linear: nn.Linear, device: torch.device) -> nn.Module:
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
