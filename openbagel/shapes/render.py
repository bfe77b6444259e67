"""The pixel-exact renderer of spec section 1: Pillow ImageDraw, fill only, no anti-aliasing."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .scene import BACKGROUNDS, CANVAS, COLORS, SIZES, Obj, Scene, cell_center


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, fill: tuple[int, int, int] | None = None) -> None:
    """Draw one object with the spec's exact primitive (`fill` overrides the colour, for masks)."""
    cx, cy = cell_center(obj.cell)
    r = SIZES[obj.size]
    fill = fill or COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The 64 x 64 RGB image of a scene, objects drawn in row-major cell order."""
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj)
    return image
