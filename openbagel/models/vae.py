"""The FLUX.1 autoencoder: images in [-1, 1] <-> scaled 16-channel latents at 1/8 resolution.

Module names match `ae.safetensors`. Sizes come from `VAEConfig`, so the same code is the 84M-parameter
FLUX AE of BAGEL-7B-MoT and the small autoencoder of the embedded Shapes model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as FLUX


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        mults = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            blocks = []
            ch_in, ch = cfg.ch * mults[i], cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch_in, ch, g))
                ch_in = ch
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_Level(blocks, None if last else Downsample(ch), "downsample"))
        self.mid = _Mid(ch, g)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, g)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, out, g))
                ch = out
            levels.insert(0, _Level(blocks, Upsample(ch) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from deepest to shallowest
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """encode() samples the posterior (as the official code) unless `sample=False`; latents are scaled."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x), unscaled."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.posterior(x)
        z = mean
        if sample:
            # Drawn where the generator lives (CPU seeds reproduce across devices, as the official app).
            device = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)
