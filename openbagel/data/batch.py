"""`PackedBatch`: the tensors one training step feeds the model.

Samples are packed into rows of a padded `[B, L]` layout (a row may hold several samples, separated
by the document mask). Every token has a kind; image tokens are filled, in row-major order of the
`[B, L]` grid, from the packed ViT patches and the packed VAE latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

# Token kinds.
PAD, TEXT, VIT, VAE = 0, 1, 2, 3


@dataclass
class PackedBatch:
    token_kind: torch.Tensor  # [B, L] int64: PAD / TEXT / VIT / VAE
    text_ids: torch.Tensor  # [B, L] int64 token ids where kind == TEXT (0 elsewhere)
    position_ids: torch.Tensor  # [B, L] int64 RoPE positions (one per image, per-sample reset)
    attn_mask: torch.Tensor  # [B, 1, L, L] bool, True = query may attend to key
    labels: torch.Tensor  # [B, L] int64 next-token targets, -100 = no loss
    ce_weights: torch.Tensor  # [B, L] float, weight of each CE position (0 where no loss)
    # ViT images, packed: patches in (p, q, c) order, absolute grid position ids, patches per image.
    vit_patches: torch.Tensor  # [Nv, p*p*3]
    vit_position_ids: torch.Tensor  # [Nv]
    vit_seqlens: list[int]
    # VAE images: pixels to encode (the train loop turns them into `latents`), and per-token data.
    vae_images: list[torch.Tensor]  # each [3, H, W] in [-1, 1]
    latent_position_ids: torch.Tensor  # [Nl] row * max_latent_size + col
    timesteps_raw: torch.Tensor  # [Nl] logit-normal draw per noisy image token, -inf for clean context
    mse_mask: torch.Tensor  # [Nl] bool: tokens of noisy targets (carry the MSE loss)
    latents: torch.Tensor | None = None  # [Nl, patch_latent_dim], filled from vae_images by the train loop
    num_samples: int = 0
    sample_ids: list[int] = field(default_factory=list)  # data position of each sample (for resume/debug)

    def to(self, device: torch.device | str) -> "PackedBatch":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            elif f.name == "vae_images" and v and v[0].device != torch.device(device):
                v = _to_device_at_once(v, device)
            values[f.name] = v
        return PackedBatch(**values)

    @property
    def num_tokens(self) -> int:
        return int((self.token_kind != PAD).sum())


def flatten_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Images of any shapes as one flat tensor and their shapes: hundreds of small images then cross a
    process or device boundary as one tensor, not one each."""
    flat = torch.cat([img.reshape(-1) for img in images]) if images else torch.empty(0)
    return flat, [tuple(img.shape) for img in images]


def unflatten_images(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Inverse of `flatten_images`: views into `flat`."""
    parts = flat.split([math.prod(shape) for shape in shapes]) if shapes else []
    return [part.view(shape) for part, shape in zip(parts, shapes)]


def _to_device_at_once(images: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Hundreds of small images moved as one flat copy (one transfer, not one per image); views back."""
    flat, shapes = flatten_images(images)
    return unflatten_images(flat.to(device, non_blocking=True), shapes)
