"""The detector of spec section 4: reads a (possibly noisy, blurred or compressed) image back into a scene.

1. A 3x3 median filter removes pixel noise; the background is the background colour nearest to the
   median border pixel.
2. Per cell, the foreground mask holds the pixels farther from the background than half the distance to
   the closest object colour; fewer than MIN_PIXELS of them means an empty cell.
3. The colour is the object colour nearest to the median of the most foreground-like half of the mask
   (the blended rim of a blurred edge is the other half).
4. Shape and size: the template with the best overlap. Overlap is a soft IoU, sum(min)/sum(max), of
   coverage maps (how far each pixel lies from the background towards the object colour, 0..1); soft
   coverage averages noise over the whole object instead of flipping edge pixels one by one, which a
   thresholded mask does on low-contrast pairs such as purple on gray.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image, ImageFilter

from .render import render
from .scene import BACKGROUNDS, CANVAS, CELLS, COLORS, SHAPES, SIZES, Obj, Scene, cell_block

MIN_PIXELS = 12  # a smaller blob is noise: the smallest drawn object (small diamond) covers 61 pixels
MIN_OVERLAP = 0.5  # a blob that matches no template this well is not a shape of this world

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array(list(BACKGROUNDS.values()), np.float32)
_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.array(list(COLORS.values()), np.float32)
_TEMPLATE_KEYS = [(shape, size) for shape in SHAPES for size in SIZES]


def _prepare(image: Image.Image) -> np.ndarray:
    if image.size != (CANVAS, CANVAS):
        raise ValueError(f"image: expected {CANVAS}x{CANVAS}, got {image.size[0]}x{image.size[1]}")
    return np.asarray(image.convert("RGB").filter(ImageFilter.MedianFilter(3)), np.float32)


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> int:
    return int(np.linalg.norm(palette - rgb, axis=1).argmin())


@cache
def _threshold(background: str) -> float:
    return 0.5 * float(np.linalg.norm(_COLOR_RGB - np.array(BACKGROUNDS[background], np.float32), axis=1).min())


def _coverage(pixels: np.ndarray, background: str, color: int) -> np.ndarray:
    """0..1: each pixel's position on the segment from the background colour to the object colour."""
    bg = np.array(BACKGROUNDS[background], np.float32)
    axis = _COLOR_RGB[color] - bg
    return np.clip((pixels - bg) @ axis / float(axis @ axis), 0.0, 1.0)


@cache
def _templates(cell: str) -> np.ndarray:
    """(16, 21, 21) coverage maps of the eight objects drawn at `cell`, sharp (rows 0-7) and blurred
    (rows 8-15), seen through the same median filter: blur rounds the corners of small squares."""
    maps = []
    for blur in (False, True):
        for shape, size in _TEMPLATE_KEYS:
            image = render(Scene("black", (Obj(shape, "red", size, cell),)))
            if blur:
                image = image.filter(ImageFilter.GaussianBlur(1))
            maps.append(_coverage(_prepare(image)[cell_block(cell)], "black", _COLOR_NAMES.index("red")))
    return np.stack(maps)


def detect(image: Image.Image) -> Scene | None:
    """The scene an image shows, or None when some cell holds a blob that is no shape of this world."""
    pixels = _prepare(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = _BG_NAMES[_nearest(np.median(border, axis=0), _BG_RGB)]
    distance = np.linalg.norm(pixels - np.array(BACKGROUNDS[background], np.float32), axis=-1)
    objects = []
    for cell in CELLS:
        block = cell_block(cell)
        mask = distance[block] > _threshold(background)
        if mask.sum() < MIN_PIXELS:
            continue
        d = distance[block][mask]
        color = _nearest(np.median(pixels[block][mask][d >= np.median(d)], axis=0), _COLOR_RGB)
        cover = _coverage(pixels[block], background, color)
        templates = _templates(cell)
        overlap = np.minimum(templates, cover).sum((1, 2)) / np.maximum(templates, cover).sum((1, 2))
        best = int(overlap.argmax())
        if overlap[best] < MIN_OVERLAP:
            return None
        shape, size = _TEMPLATE_KEYS[best % len(_TEMPLATE_KEYS)]
        objects.append(Obj(shape, _COLOR_NAMES[color], size, cell))
    return Scene(background, tuple(objects))
