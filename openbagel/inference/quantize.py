"""Weight-only quantisation, applied from outside the model (the modules stay pure).

    from openbagel.inference.quantize import quantize
    quantize(pipe.engine.model, "int8")          # any device: int8 weights + per-channel scales

Modes:
  int8          ours (gpt-fast's WeightOnlyInt8Linear): symmetric per-output-channel int8; the forward
                dequantises the weight to the activation dtype and runs the ordinary matmul. Resident
                weights shrink 4x from fp32 (2x from bf16); on CPU each matmul pays the dequantisation.
  torchao-int8  torchao `Int8WeightOnlyConfig` (CUDA; needs `pip install openbagel[quant]`).
  torchao-int4  torchao `Int4WeightOnlyConfig` (CUDA, bf16 model).
  bnb-int8      bitsandbytes `Linear8bitLt` (CUDA; needs bitsandbytes).
  bnb-nf4       bitsandbytes `Linear4bit` NF4 (CUDA; needs bitsandbytes).

By default every `nn.Linear` of the language model is quantised (the MoT experts and lm_head hold
almost all the weights); pass `include` to choose others by qualified name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "torchao-int8", "torchao-int4", "bnb-int8", "bnb-nf4")


def language_model_linears(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("language_model.")


class Int8Linear(nn.Module):
    """y = (x @ dequant(W).T) + b with W int8 [out, in] and one fp scale per output channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scales.to(linear.weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize(model: nn.Module, mode: str = "int8",
             include: Callable[[str, nn.Module], bool] = language_model_linears) -> nn.Module:
    """Replace the selected Linear layers in place; returns the model."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}; choose one of {MODES}")
    names = [name for name, m in model.named_modules() if include(name, m)]
    if mode.startswith("torchao"):
        return _torchao(model, mode, set(names))
    make = Int8Linear.from_linear if mode == "int8" else _bnb_factory(mode)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return model


def _torchao(model: nn.Module, mode: str, names: set[str]) -> nn.Module:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ImportError(f"{mode} needs torchao: pip install 'openbagel[quant]'") from None
    config = Int8WeightOnlyConfig() if mode == "torchao-int8" else Int4WeightOnlyConfig()
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    return model


def _bnb_factory(mode: str) -> Callable[[nn.Linear], nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"{mode} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes") from None

    def make(linear: nn.Linear) -> nn.Module:
        dev = linear.weight.device
        if mode == "bnb-int8":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                      has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                    compute_dtype=linear.weight.dtype, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return new.to(dev)  # moving to CUDA quantises

    return make


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (what quantisation shrinks)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
