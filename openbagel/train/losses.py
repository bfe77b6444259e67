"""The training objective: CE and MSE, each a per-token mean over the whole global batch.

A global batch is every micro-batch of every rank in one optimiser step. Token counts are known from
the packed batches before any forward, so they are all-reduced first; each micro-batch then adds
`world * sum / global_count` to the objective. FSDP averages gradients over ranks (divides by world),
so the update is the gradient of the global per-token mean whatever the split into ranks and
micro-batches (the official trainer normalises the same way, per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batch import PackedBatch
from ..models.bagel import LossTerms
from .parallel import all_reduce_sum


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    mse: float = 1.0


def global_token_counts(batches: list[PackedBatch], device: torch.device) -> torch.Tensor:
    """[CE weight sum, MSE token count] over these micro-batches, summed over all ranks."""
    local = torch.tensor([[float(b.ce_weights.sum()), float(b.mse_mask.sum())] for b in batches]).sum(0)
    return all_reduce_sum(local.to(device, torch.float64)).float()


def objective(terms: LossTerms, counts: torch.Tensor, weights: LossWeights, world_size: int) -> torch.Tensor:
    """This micro-batch's share of `weights.ce * CE + weights.mse * MSE` (scaled for FSDP's averaging)."""
    ce_total, mse_total = counts.clamp(min=1.0).unbind()
    return world_size * (weights.ce * terms.ce_sum / ce_total + weights.mse * terms.mse_sum / mse_total)


def reported_losses(sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """(CE, MSE) per-token means of a step from the local [ce_sum, mse_sum] accumulated over micro-batches."""
    sums = all_reduce_sum(sums.detach().clone())
    ce, mse = (sums / counts.clamp(min=1.0)).tolist()
    return ce, mse
