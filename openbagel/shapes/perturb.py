"""Image perturbations that mimic generated images, for testing and benchmarking the detector."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def add_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian pixel noise, sigma in 0..255 units."""
    pixels = np.asarray(image, np.float32) + rng.normal(0.0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def blur(image: Image.Image, radius: float = 1.0) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


CONDITIONS = {
    "clean": lambda im, rng: im,
    "noise10": lambda im, rng: add_noise(im, 10, rng),
    "noise20": lambda im, rng: add_noise(im, 20, rng),
    "blur1": lambda im, rng: blur(im),
    "jpeg75": lambda im, rng: jpeg(im),
    "blur1+noise20+jpeg75": lambda im, rng: jpeg(add_noise(blur(im), 20, rng)),
}
