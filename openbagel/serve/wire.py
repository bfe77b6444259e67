"""The parts of the server's wire format that need none of the serving extras: its limits and the
OpenAI 'WxH' size syntax. The CLI shares both, so `openbagel --help` and `generate --size` work on a
base install."""

from __future__ import annotations

import re

MAX_BODY_BYTES = 64 * 2**20  # a little above the largest image file accepted (processing.MAX_IMAGE_BYTES)
MAX_IMAGES_PER_REQUEST = 4  # `n`
MAX_MESSAGES = 64
DEFAULT_QUEUE_SIZE = 16  # requests waiting for the model; one more gets 429
DEFAULT_TIMEOUT_S = 600.0

SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width); None or 'auto' -> the model's default. The pipeline checks the values."""
    if size is None or size == "auto":
        return None, None
    m = SIZE_RE.match(size)
    if not m:
        raise ValueError(f"size must look like '512x512' (width x height) or 'auto', got {size!r}")
    return int(m.group(2)), int(m.group(1))
