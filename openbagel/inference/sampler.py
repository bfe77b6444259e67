"""Rectified-flow sampling maths: schedule, Euler step, classifier-free guidance with renorm.

Pure functions over tensors; nothing here knows about the model. Conventions (reference 5.3–5.4):
x_t = (1 - t) x_0 + t eps, the network predicts v = eps - x_0, sampling runs t from 1 to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RENORM_TYPES = ("global", "channel", "text_channel")
EPS = 1e-8


@dataclass(frozen=True)
class FlowParams:
    """Settings of one image generation, under BAGEL's names."""

    num_timesteps: int = 50  # grid points; the model runs num_timesteps - 1 times per branch
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg_interval", tuple(float(x) for x in self.cfg_interval))
        check = [
            (isinstance(self.num_timesteps, int) and 2 <= self.num_timesteps <= 1000,
             f"num_inference_steps must be an integer from 2 to 1000, got {self.num_timesteps!r}"),
            (_finite(self.timestep_shift) and 0 < self.timestep_shift <= 100,
             f"timestep_shift must be a number in (0, 100], got {self.timestep_shift!r}"),
            (_finite(self.cfg_text_scale) and 0 <= self.cfg_text_scale <= 100,
             f"cfg_text_scale (guidance_scale) must be a number in [0, 100], got {self.cfg_text_scale!r}"),
            (_finite(self.cfg_img_scale) and 0 <= self.cfg_img_scale <= 100,
             f"cfg_img_scale (image_guidance_scale) must be a number in [0, 100], got {self.cfg_img_scale!r}"),
            (len(self.cfg_interval) == 2 and all(_finite(x) for x in self.cfg_interval)
             and 0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1,
             f"cfg_interval must be two numbers 0 <= start <= end <= 1, got {self.cfg_interval!r}"),
            (self.cfg_renorm_type in RENORM_TYPES,
             f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}"),
            (_finite(self.cfg_renorm_min) and 0 <= self.cfg_renorm_min <= 1,
             f"cfg_renorm_min must be a number in [0, 1], got {self.cfg_renorm_min!r}"),
        ]
        for ok, message in check:
            if not ok:
                raise ValueError(message)

    @property
    def uses_text_cfg(self) -> bool:
        return self.cfg_text_scale > 1.0

    @property
    def uses_img_cfg(self) -> bool:
        # Image guidance only ever applies on top of text guidance (reference 5.4).
        return self.cfg_text_scale > 1.0 and self.cfg_img_scale > 1.0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def timesteps(num_timesteps: int, shift: float) -> torch.Tensor:
    """The shifted grid t'_0 = 1 > ... > t'_{n-1} = 0 (fp32), as the official sampler computes it."""
    t = torch.linspace(1, 0, num_timesteps)
    return shift * t / (1 + (shift - 1) * t)


def cfg_active(t: float, interval: tuple[float, float]) -> bool:
    """Guidance applies at step time t iff lo < t <= hi."""
    return interval[0] < t <= interval[1]


def cfg_combine(
    v_cond: torch.Tensor,
    v_text: torch.Tensor | None,
    v_img: torch.Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Guided velocity of ONE image (tokens x channels), with BAGEL's CFG-renorm.

    The global norm is taken over this image only; the official code takes it over the whole packed
    batch, which mixes images of a batch — a bug we do not reproduce.
    """
    if text_scale <= 1.0 or v_text is None:
        return v_cond
    guided = v_text + text_scale * (v_cond - v_text)
    if renorm_type == "text_channel":
        ratio = v_cond.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + EPS)
        guided = guided * ratio.clamp(min=renorm_min, max=1.0)
        if img_scale > 1.0 and v_img is not None:
            guided = v_img + img_scale * (guided - v_img)
        return guided
    if img_scale > 1.0 and v_img is not None:
        guided = v_img + img_scale * (guided - v_img)
    if renorm_type == "global":
        ratio = v_cond.norm() / (guided.norm() + EPS)
    elif renorm_type == "channel":
        ratio = v_cond.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + EPS)
    else:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    return guided * ratio.clamp(min=renorm_min, max=1.0)


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """One Euler step of size dt = t - t_next > 0 (an fp32 scalar tensor, as the official loop)."""
    return x - v.to(x.dtype) * dt
