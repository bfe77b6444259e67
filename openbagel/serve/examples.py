"""Shapes-world examples for the app and `openbagel demo`: prompts the embedded model was trained on.

Drawn from the Shapes task generators with fixed seeds and rendered on the fly, so they always match
the world's current grammar and no image files ship with the package.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from ..shapes.render import render
from ..shapes.tasks import make_task, parse_kind


@dataclass(frozen=True)
class Example:
    text: str
    image: Image.Image | None = None  # the source scene (edit, question); None for text-to-image


def shapes_examples(kind: str, n: int = 3, seed: int = 0) -> list[Example]:
    """`n` examples of a Shapes task kind (generate, edit, reason_edit, question, reason_question), or of one
    sub-kind (`generate:position`)."""
    rng = random.Random(f"{kind}:{seed}")
    tasks = [make_task(rng, *parse_kind(kind)) for _ in range(n)]
    return [Example(t.text, render(t.source) if t.source is not None else None) for t in tasks]
