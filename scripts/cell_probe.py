"""Can the model tell where an object is? One object in each of the nine cells, on an empty canvas.

For each cell it reports the model's answer to `where is the {shape}?` (the inference path users
see), which ViT input patch changed most against the empty canvas (it must lie in that cell: a check of
the image layout), and, with the question run teacher-forced in the training layout, how sharply the token
predicting the answer attends over the image: the spread of its attention logits across the image
tokens (log of max/min weight; QK-norm bounds it near 2 * sqrt(head_dim)) and the weight on the
object's tokens. Answers that ignore the cell mean the model reads a uniform average of the image.
Usage: python scripts/cell_probe.py openbagel/weights/shapes-tiny [--shape circle --color red]
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_probe import object_patches, print_per_head, teacher_forced  # noqa: E402

from openbagel.inference.pipeline import BagelPipeline  # noqa: E402
from openbagel.processing import patchify_image, resize, target_size, to_tensor  # noqa: E402
from openbagel.shapes.render import render  # noqa: E402
from openbagel.shapes.samples import training_sample  # noqa: E402
from openbagel.shapes.scene import CANVAS, CELLS, COLORS, SHAPES, Obj, Scene, cell_block  # noqa: E402
from openbagel.shapes.tasks import Step, Task  # noqa: E402


def token_cells(cfg, cell: str) -> set[int]:
    """ViT tokens whose patch overlaps the cell's 21 x 21 block (in the resized ViT input)."""
    p, size = cfg.vit.patch_size, target_size(CANVAS, CANVAS, cfg.vit_transform)[0]
    rows, cols = cell_block(cell)
    scale, grid = size / CANVAS, size // p
    r0, r1 = int(rows.start * scale) // p, int((rows.stop - 1) * scale) // p
    c0, c1 = int(cols.start * scale) // p, int((cols.stop - 1) * scale) // p
    return {r * grid + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--shape", default="circle", choices=SHAPES)
    ap.add_argument("--color", default="red", choices=list(COLORS))
    args = ap.parse_args()
    pipe = BagelPipeline.from_pretrained(args.model)
    model, cfg, tok = pipe.engine.model, pipe.config, pipe.tokenizer
    question = f"where is the {args.shape}?"
    patches = lambda scene: patchify_image(to_tensor(resize(render(scene), cfg.vit_transform)), cfg.vit.patch_size)
    empty = patches(Scene("black", ()))
    layers, heads = cfg.llm.num_hidden_layers, cfg.llm.num_attention_heads
    spread = torch.zeros(layers, heads)
    on_object = torch.zeros(layers, heads)
    right, answers = 0, []
    print(f"{'cell':<13} {'answer':<14} right  most-changed ViT patch (in the cell?)")
    for cell in CELLS:
        obj = Obj(args.shape, args.color, "large", cell)
        scene = Scene("black", (obj,))
        answer = pipe.understand(render(scene), question).text.strip()
        answers.append(answer)
        right += answer == cell
        changed = int((patches(scene) - empty).abs().amax(-1).argmax())
        print(f"{cell:<13} {answer:<14} {'yes' if answer == cell else 'no':<6} "
              f"{changed} ({'yes' if changed in token_cells(cfg, cell) else 'NO'})")
        task = Task("question", "where", scene, (Step(question, "", answer=cell),))
        _, store, first, vit = teacher_forced(model, training_sample(task, think=False, rng=random.Random(0)), tok, cfg)
        obj_tokens = vit[object_patches(scene, obj, cfg)]
        for layer, weights in enumerate(store):
            row = weights[0, :, first]  # [heads, keys]
            image = row[:, vit].clamp(min=1e-30)
            spread[layer] += (image.amax(-1) / image.amin(-1)).log() / len(CELLS)
            on_object[layer] += row[:, obj_tokens].sum(-1) / len(CELLS)
    print(f"answers right {right}/{len(CELLS)}, distinct answers {len(set(answers))}")
    print_per_head("layer  attention-logit spread over image tokens per head   attention on the object per head",
                   spread, on_object, "5.3f")


if __name__ == "__main__":
    main()
