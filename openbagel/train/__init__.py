"""Training: packed multimodal batches, losses, FSDP2, resumable checkpoints, recipes."""

from .main import register

__all__ = ["register"]
