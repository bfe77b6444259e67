"""The model card's example strip: one Shapes scene, drawn from its caption, edited four ways, and asked two
questions, with the given weights at seed 0 and default settings.

Usage: python scripts/model_card_examples.py [MODEL] [--out docs/embedded/examples/examples.png]
Prints the caption, the edit instructions and the answers next to the expected ones.
"""

from __future__ import annotations

import argparse

from PIL import Image

from openbagel import BagelPipeline
from openbagel.shapes.render import render
from openbagel.shapes.scene import Obj, Scene
from openbagel.shapes.text import caption

SCENE = Scene("black", (Obj("circle", "red", "large", "top left"), Obj("square", "blue", "small", "center"),
                        Obj("triangle", "green", "large", "bottom right")))
EDITS = ["change the background to white", "remove the blue square", "make the red circle yellow",
         "move the red circle to the top right"]
QUESTIONS = [("what color is the square at the center?", "blue"), ("how many shapes are there?", "3"),
             ("where is the blue square?", "center")]  # the spec's question templates (shapes-world.md 3.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--out", default="docs/embedded/examples/examples.png")
    args = parser.parse_args()
    pipe = BagelPipeline.from_pretrained(args.model)  # None: the embedded model
    pipe.set_progress_bar_config(disable=True)
    source = render(SCENE)
    text = caption(SCENE)
    print(f"caption: {text}")
    tiles = [source, pipe.generate(text, seed=0).images[0]]
    for instruction in EDITS:
        tiles.append(pipe.edit(source, instruction, seed=0).images[0])
        print(f"edit: {instruction}")
    for question, expected in QUESTIONS:
        print(f"{question} -> {pipe.understand(source, question, seed=0).text!r} (expected {expected!r})")
    size, gap = 128, 8
    strip = Image.new("RGB", (len(tiles) * (size + gap) - gap, size), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile.convert("RGB").resize((size, size), Image.NEAREST), (i * (size + gap), 0))
    strip.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
