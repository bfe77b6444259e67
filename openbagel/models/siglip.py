"""SigLIP NaViT vision encoder: variable-size images, packed, full attention within each image.

Names follow the official checkpoint (`vit_model.vision_model.*`). The patch embedding is a Linear over
patches flattened in (row-in-patch, col-in-patch, channel) order, and position ids are absolute
coordinates on the `vit_max_num_patch_per_side`-wide grid (row * grid + col).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig
from .layers import attention


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, grid: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(grid * grid, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, H // cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, H = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, mask).transpose(1, 2).reshape(B, L, H))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, grid: int) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg, grid)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """`vit_model`: encodes a packed list of images and returns one feature row per patch."""

    def __init__(self, cfg: ViTConfig, grid: int) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg, grid)
        self.gradient_checkpointing = False

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """patches [N, p*p*c] packed over images, position_ids [N], seqlens per image -> [N, hidden]."""
        vm = self.vision_model
        x = vm.embeddings(patches, position_ids)
        rows, valid, mask = _pad_rows(x, seqlens)
        for layer in vm.encoder.layers:
            if self.gradient_checkpointing and self.training:
                rows = torch.utils.checkpoint.checkpoint(layer, rows, mask, use_reentrant=False)
            else:
                rows = layer(rows, mask)
        return vm.post_layernorm(rows[valid])


def _pad_rows(x: torch.Tensor, seqlens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Lay packed images out as padded rows [B, Lmax, C] with a key-padding mask (None if all equal)."""
    B, Lmax = len(seqlens), max(seqlens)
    lens = torch.tensor(seqlens, device=x.device)
    valid = torch.arange(Lmax, device=x.device)[None, :] < lens[:, None]  # [B, Lmax]
    if all(n == Lmax for n in seqlens):
        return x.view(B, Lmax, -1), valid, None
    rows = x.new_zeros(B, Lmax, x.shape[-1])
    rows[valid] = x
    return rows, valid, valid[:, None, None, :]
