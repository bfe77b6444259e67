"""Training: packed multimodal batches, losses, FSDP2, resumable checkpoints, recipes."""

from .main import register, train_main

__all__ = ["register", "train_main"]
