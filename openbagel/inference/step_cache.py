"""Opt-in step caching for the denoising loop (TaylorSeer / TeaCache family).

On a cached step the model is not run: the raw velocity of EVERY row is predicted from the velocities
of the last full forwards, by a Newton polynomial in t through the last `order + 1` of them (order 0
reuses the last one, as FORA / TeaCache; order >= 1 is TaylorSeer's finite-difference expansion). The
prediction is made per row, i.e. per guidance branch, and the engine then applies classifier-free
guidance to the predicted v_cond / v_text / v_img exactly as on a full step. Caching the guided
velocity, or only the conditional one, would drop the guidance branches (a known bug elsewhere);
here a step whose rows were not all computed before always runs the full forward.

When to compute: the first `warmup` and the last `final` steps always; in between every `interval`
steps, or, with `threshold` set, TeaCache's rule: when the accumulated relative L1 change of the query
block embedding since the last full forward reaches the threshold.

    engine.step_cache = StepCacheConfig(interval=2, order=1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCacheConfig:
    interval: int = 2  # a full forward every `interval` steps (when threshold is None)
    order: int = 1  # degree of the extrapolating polynomial (0 = reuse the last velocity)
    warmup: int = 2  # first steps always computed
    final: int = 1  # last steps always computed
    threshold: float | None = None  # TeaCache rule: compute when the accumulated rel. L1 input change reaches it

    def __post_init__(self) -> None:
        if self.interval < 1 or self.order < 0 or self.warmup < 1 or self.final < 0:
            raise ValueError("step cache needs interval >= 1, order >= 0, warmup >= 1, final >= 0")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError("step cache threshold must be positive")

    def start(self, total_steps: int) -> StepCache:
        return StepCache(self, total_steps)


class StepCache:
    """The state of one denoising loop: recent full-forward velocities and the skip decision."""

    def __init__(self, cfg: StepCacheConfig, total_steps: int) -> None:
        self.cfg, self.total = cfg, total_steps
        self.history: list[tuple[float, torch.Tensor]] = []  # (t, raw velocities [rows, L, C]), oldest first
        self.last_input: torch.Tensor | None = None
        self.change = 0.0  # accumulated relative L1 change of the input since the last full forward
        self.computed = 0
        self.skipped = 0

    def predict(self, step: int, t: float, rows: int, block: torch.Tensor) -> torch.Tensor | None:
        """Predicted velocities of the first `rows` rows at time t, or None: run the model."""
        cfg = self.cfg
        if self.last_input is not None:
            self.change += float((block - self.last_input).abs().mean() / self.last_input.abs().mean().clamp_min(1e-12))
        self.last_input = block.clone()
        usable = [(tt, v[:rows]) for tt, v in self.history if v.shape[0] >= rows][-(cfg.order + 1):]
        if not usable or step < cfg.warmup or step >= self.total - cfg.final:
            return None
        due = (self.change >= cfg.threshold if cfg.threshold is not None
               else (step - cfg.warmup) % cfg.interval == 0)
        if due:
            return None
        self.skipped += 1
        return newton_extrapolate([tt for tt, _ in usable], [v for _, v in usable], t)

    def update(self, t: float, velocities: torch.Tensor) -> None:
        """Record a full forward's raw velocities (all rows it computed)."""
        self.history = [*self.history, (t, velocities)][-(self.cfg.order + 1):]
        self.change = 0.0
        self.computed += 1


def newton_extrapolate(ts: list[float], vs: list[torch.Tensor], t: float) -> torch.Tensor:
    """Value at t of the polynomial through (ts[i], vs[i]) (Newton divided differences)."""
    coef = list(vs)
    n = len(ts)
    for j in range(1, n):
        for i in range(n - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (ts[i] - ts[i - j])
    out = coef[-1]
    for i in range(n - 2, -1, -1):
        out = coef[i] + (t - ts[i]) * out
    return out
