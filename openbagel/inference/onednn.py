"""fp32 Linear layers on oneDNN with their weights reordered once, for CPU inference.

`F.linear` on CPU calls MKL's sgemm, which repacks the weight on every call. oneDNN's matmul over a
weight reordered once into its blocked layout (what Inductor does when it freezes weights) is faster at
every shape BAGEL runs on this AVX2 CPU: 1.1-1.3x at the 7B widths (M = 516 rows: 132 -> 154 GFLOP/s),
1.3-1.6x at the embedded model's width, ~4x for the few rows of token-by-token decoding. Outputs agree
with `F.linear` to ~1e-6 relative (another summation order).

    from openbagel.inference.onednn import pack_linears
    pack_linears(pipe.engine.model)        # BagelPipeline.from_pretrained does it for fp32 on CPU

A layer packs on its first call, so a layer a task never runs (the 2.2 GB `lm_head` of the 7B in
text-to-image) is never read. The packed weight then replaces the original: a weight that lies in the
checkpoint's file mapping (safetensors loads zero-copy) has its pages dropped from the process, so it is
not counted twice. A packed model is for inference only: it has no `weight` parameters to train, save,
quantise or offload; `unpack_linears` restores plain layers (the engine does it before `compile_step`
compiles the decoder layers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint import release_file_pages
from .quantize import replace_modules


# Below this many weights a layer stays on MKL: oneDNN's per-call overhead (~20 us) outweighs its faster
# kernel (the unit-test model's 64-wide layers ran 2x slower packed).
MIN_PACKED_WEIGHTS = 1 << 17
_PACKING = threading.Lock()


def packable_linears(name: str, module: nn.Module) -> bool:
    """The language model's and the ViT's Linear layers with at least MIN_PACKED_WEIGHTS weights."""
    return (type(module) is nn.Linear and name.startswith(("language_model.", "vit_model."))
            and module.in_features * module.out_features >= MIN_PACKED_WEIGHTS)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held in oneDNN's blocked layout, reordered on the first call."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 512) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rows_hint = linear.in_features, linear.out_features, rows_hint
        self._weight: torch.Tensor | None = linear.weight.detach()  # until the first call
        self.register_buffer("packed", None, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            with _PACKING:  # two threads' first calls must not both reorder (the second would find no weight)
                if self.packed is None:
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(self._weight, self.rows_hint)
                    release_file_pages(self._weight)
                    self._weight = None
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def to_linear(self) -> nn.Linear:
        """The plain layer back (torch.compile cannot trace the opaque packed weight)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = self._weight if self.packed is None else self.packed.to_dense()
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"


def pack_linears(model: nn.Module, include: Callable[[str, nn.Module], bool] = packable_linears) -> int:
    """Replace the selected fp32 CPU Linear layers in place; returns how many."""
    return len(replace_modules(model, include, PackedLinear))


def unpack_linears(model: nn.Module) -> int:
    """Undo pack_linears in place; returns how many layers were packed."""
    return len(replace_modules(model, lambda name, m: isinstance(m, PackedLinear), PackedLinear.to_linear))
