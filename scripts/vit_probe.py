"""Linear probe: how much do a checkpoint's ViT tokens say about each cell of a Shapes scene?

Ridge regression from all ViT tokens of an image (connector output + 2-D position table) to
"colour or empty" per cell, fitted on 1,000 random scenes and scored on 200 more. `--random`
re-initialises the model first: the baseline a trained ViT should beat.
Usage: python scripts/vit_probe.py openbagel/weights/shapes-tiny [--random]
"""

import argparse
import random

import torch

from openbagel.checkpoint import load_checkpoint
from openbagel.models.bagel import grid_position_ids
from openbagel.processing import patchify_image, resize, to_tensor
from openbagel.shapes.render import render
from openbagel.shapes.scene import CELLS, COLORS
from openbagel.shapes.tasks import random_scene

COLOR_NAMES = list(COLORS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--random", action="store_true", help="probe a random initialisation of the same config")
    args = ap.parse_args()
    ck = load_checkpoint(args.model)
    model, cfg = ck.model.float().eval(), ck.config
    if args.random:
        torch.manual_seed(0)
        model.init_weights()
    rng = random.Random(0)
    features, labels = [], []
    with torch.no_grad():
        for _ in range(1200):
            scene = random_scene(rng)
            pixels = to_tensor(resize(render(scene), cfg.vit_transform))
            p = cfg.vit.patch_size
            h, w = pixels.shape[1] // p, pixels.shape[2] // p
            ids = grid_position_ids(h, w, cfg.vit_max_num_patch_per_side)
            features.append(model.embed_vit(patchify_image(pixels, p), ids, [h * w]).flatten())
            target = torch.zeros(9, 7)  # per cell: empty, or one of the six colours
            for i, cell in enumerate(CELLS):
                obj = scene.at(cell)
                target[i, COLOR_NAMES.index(obj.color) + 1 if obj else 0] = 1
            labels.append(target.flatten())
    X, Y = torch.stack(features), torch.stack(labels)
    X = (X - X[:1000].mean(0)) / (X[:1000].std(0) + 1e-5)
    train_x, train_y, test_x, test_y = X[:1000], Y[:1000], X[1000:], Y[1000:]
    for lam in (1.0, 10.0, 100.0):
        W = torch.linalg.solve(train_x.T @ train_x + lam * torch.eye(X.shape[1]), train_x.T @ train_y)
        pred, truth = (test_x @ W).view(-1, 9, 7).argmax(-1), test_y.view(-1, 9, 7).argmax(-1)
        occupied = ((pred == truth) & (truth > 0)).sum() / (truth > 0).sum()
        print(f"lambda {lam:>5}: cells right {(pred == truth).float().mean():.3f}, occupied cells right {occupied:.3f}")


if __name__ == "__main__":
    main()
