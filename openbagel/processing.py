"""Images <-> tensors: the official resize rules, and the patch layouts of the ViT and the latents.

This is the only module (with the pipeline) that touches PIL. Rules follow reference section 5.7:
bicubic resize with antialias, sides rounded to the stride, a pixel budget, RGBA composited on white.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import ImageTransformConfig


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (as the official `pil_img2rgb`)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _round_to(x: float, stride: int) -> int:
    return max(stride, int(round(x / stride)) * stride)


def target_size(width: int, height: int, rule: ImageTransformConfig, img_num: int = 1) -> tuple[int, int]:
    """(width, height) after the official resize: scale to [min, max] side, round to stride, cap pixels."""
    scale = min(rule.max_size / max(width, height), 1.0)
    scale = max(scale, rule.min_size / min(width, height))
    w, h = _round_to(width * scale, rule.stride), _round_to(height * scale, rule.stride)
    budget = rule.max_pixels / img_num
    if w * h > budget:
        shrink = (budget / (w * h)) ** 0.5
        w, h = _round_to(w * shrink, rule.stride), _round_to(h * shrink, rule.stride)
    if max(w, h) > rule.max_size:
        shrink = rule.max_size / max(w, h)
        w, h = _round_to(w * shrink, rule.stride), _round_to(h * shrink, rule.stride)
    return w, h


def resize(image: Image.Image, rule: ImageTransformConfig) -> Image.Image:
    size = target_size(*image.size, rule)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> float [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [-1, 1] -> RGB PIL, truncating like the official decode (no rounding)."""
    arr = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def patchify_image(x: torch.Tensor, p: int) -> torch.Tensor:
    """[..., C, H, W] -> [..., (H/p)*(W/p), p*p*C] rows in (row-in-patch, col-in-patch, channel) order;
    leading dims (a stack of same-size images) cost no extra operations."""
    *lead, C, H, W = x.shape
    n = len(lead)
    x = x.reshape(*lead, C, H // p, p, W // p, p)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # [..., h, w, p, p, C]
    return x.reshape(*lead, (H // p) * (W // p), p * p * C)


def patchify_latent(z: torch.Tensor, p: int) -> torch.Tensor:
    """Latent [..., C, 2h, 2w] -> tokens [..., h*w, p*p*C] in (dy, dx, channel) order (same layout as the ViT)."""
    return patchify_image(z, p)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify_latent`: [h*w, p*p*C] -> [C, h*p, w*p]."""
    x = tokens.reshape(h, w, p, p, channels).permute(4, 0, 2, 1, 3)
    return x.reshape(channels, h * p, w * p)


MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decoded pixels; anything larger is refused before decoding
MAX_IMAGE_BYTES = 50 * 1024 * 1024


class ImageLoadError(ValueError):
    """An input that is not a usable image; the message names the problem."""


def open_image(source, name: str = "image") -> Image.Image:
    """Open an image file (path, bytes or file object) safely: size checked before decoding, RGB out.

    Decompression bombs are refused from the header alone; truncated or non-image files get a clear
    error instead of a PIL traceback.
    """
    import io
    from pathlib import Path

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError(f"{name} is empty (0 bytes)")
        if len(source) > MAX_IMAGE_BYTES:
            raise ImageLoadError(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
        fp = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        name = f"{name} {path}"  # every message below names the file
        if not path.is_file():
            raise ImageLoadError(f"{name} does not exist or is not a file")
        size = path.stat().st_size
        if size == 0:
            raise ImageLoadError(f"{name} is empty (0 bytes)")
        if size > MAX_IMAGE_BYTES:
            raise ImageLoadError(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
        fp = io.BytesIO(path.read_bytes())
    else:
        fp = source
    try:
        with Image.open(fp) as probe:
            w, h = probe.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageLoadError(f"{name} is {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS} pixels")
            if w < 1 or h < 1:
                raise ImageLoadError(f"{name} has no pixels")
            probe.load()
            image = probe.copy()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:
        raise ImageLoadError(f"{name} is too large to decode safely (decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated file" if "truncated" in str(exc).lower() else "unknown or corrupt format"
        raise ImageLoadError(f"{name} is not a readable image ({reason}); use a PNG, JPEG or WebP file") from None
    return to_rgb(image)
