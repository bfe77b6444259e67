"""Interleaved training samples: the list of text blocks and images the trainer packs into one sequence.

Shared by data sources (e.g. `openbagel.shapes.samples`) and the trainer, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass
class TextItem:
    """One `<|im_start|> text <|im_end|>` block; loss=True trains the model to write it."""

    text: str
    loss: bool = False


@dataclass
class ImageItem:
    """An image. loss=True: a generation target (noisy VAE latent, MSE loss), followed by its clean VAE
    and/or ViT copies as context for what comes next when vae / vit are set."""

    image: Image.Image
    loss: bool = False
    vae: bool = True
    vit: bool = True


Item = TextItem | ImageItem
Sample = list[Item]
