"""Small building blocks shared by the BAGEL modules: norms, RoPE, MLPs, embeddings, attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: statistics in fp32, weight applied after casting back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SwiGLU(nn.Module):
    """Qwen2 MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotate-half RoPE: position_ids [...] -> [..., head_dim] each (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # [..., head_dim/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, D]; cos/sin [B, L, D]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding on the raw flow time t in [0, 1]: [cos, sin] features -> MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class MLPConnector(nn.Module):
    """ViT features -> LLM width: fc1, tanh-GELU, fc2."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """The fixed DiT/MAE 2-D sin-cos table, [grid*grid, dim], row k = i*grid + j.

    As in DiT, the first half of the channels encodes the column j and the second half the row i;
    each half is [sin(pos*omega), cos(pos*omega)] with omega_d = 1/10000^(d/(dim/4)). Computed in
    float64 like the numpy original, then rounded to fp32.
    """
    if dim % 4:
        raise ValueError("sin-cos table width must be divisible by 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows = coords.repeat_interleave(grid)  # i for k = i*grid + j
    cols = coords.repeat(grid)  # j
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PositionEmbedding(nn.Module):
    """A frozen sin-cos table stored as a parameter (it is part of the official state dict)."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def reset_parameters(self, centre_on: torch.Tensor | None = None, scale: float = 1.0) -> None:
        """The sin-cos table; with `centre_on` (the position ids a model's images use) minus its mean over
        those rows, times `scale`. On a small grid most sin-cos dimensions are nearly constant, and that
        shared part, not the position, dominates every token (MODEL_CARD.md, "Limits")."""
        table = sincos_2d_table(self.pos_embed.shape[1], self.grid)
        if centre_on is not None:
            table = (table - table[centre_on].mean(0)) * scale
        with torch.no_grad():
            self.pos_embed.copy_(table)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def grid_position_ids(rows: int, cols: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """Extrapolated 2-D position ids of a rows x cols token grid on a `grid`-wide table: r*grid + c."""
    if rows > grid or cols > grid:
        raise ValueError(f"a {rows}x{cols} token grid does not fit the {grid}x{grid} position table")
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    return (r * grid + c).flatten()


@dataclass(frozen=True)
class KeySuffixes:
    """Attention without a mask: rows [a, b) of a batch attend to keys [start:] of their rows.

    A denoising block whose rows are full (no padded queries) against right-aligned caches needs no
    mask at all, only where each row's keys begin; rows that share a start run as one call. Dense masks
    keep fused GPU kernels from their fast paths (flash attention takes none).
    """

    groups: tuple[tuple[int, int, int], ...]  # (first row, last row + 1, first key)

    @classmethod
    def from_starts(cls, starts: list[int]) -> "KeySuffixes":
        groups: list[tuple[int, int, int]] = []
        for row, start in enumerate(starts):
            if groups and groups[-1][2] == start:
                groups[-1] = (groups[-1][0], row + 1, start)
            else:
                groups.append((row, row + 1, start))
        return cls(tuple(groups))

    def rows(self, rows: slice) -> "KeySuffixes":
        """The same spans for the batch rows[start:stop], renumbered from 0."""
        lo, hi = rows.start or 0, rows.stop
        return KeySuffixes(tuple((max(a, lo) - lo, min(b, hi) - lo, s) for a, b, s in self.groups
                                 if max(a, lo) < min(b, hi)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | KeySuffixes | None) -> torch.Tensor:
    """SDPA with grouped K/V heads: q [B, Hq, L, D], k/v [B, Hkv, S, D]; mask bool [B, 1, L, S] (True =
    attend), or KeySuffixes (each group of rows attends to a suffix of its keys, unmasked).
    """
    if isinstance(mask, KeySuffixes):
        if len(mask.groups) == 1 and mask.groups[0][:2] == (0, q.shape[0]):
            start = mask.groups[0][2]
            return attention(q, k[:, :, start:], v[:, :, start:], None)
        return torch.cat([attention(q[a:b], k[a:b, :, s:], v[a:b, :, s:], None) for a, b, s in mask.groups])
    grouped = q.shape[1] != k.shape[1]
    if grouped and not _fused_gqa(q, masked=mask is not None):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        grouped = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)


def _fused_gqa(q: torch.Tensor, masked: bool) -> bool:
    """Whether a fused SDPA kernel reads grouped K/V heads itself (`enable_gqa`) for these inputs.

    On CPU the flash kernel does. On CUDA (measured on an H100, benchmarks/attention_kernels.py): cuDNN,
    PyTorch's first choice on Hopper, takes grouped heads with or without a mask, 13% faster than K/V
    expanded to the query heads; flash takes them from sm80 on, but no mask; the memory-efficient kernel
    never. Anywhere else `enable_gqa` would fall back to the unfused math kernel, so K/V are expanded.
    """
    if q.device.type == "cpu":
        return True
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    major, _ = torch.cuda.get_device_capability(q.device)
    return major >= 9 or (major >= 8 and not masked)
