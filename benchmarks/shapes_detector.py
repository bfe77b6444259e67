"""Detector accuracy (spec section 4) on random scenes, clean and perturbed like generated images.

    python benchmarks/shapes_detector.py [--n 3000] [--seed 0] [--out benchmarks/shapes_detector.json]

A scene counts as correct when its detected scene equals it exactly (background and every object).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from openbagel.shapes.detect import detect
from openbagel.shapes.perturb import CONDITIONS
from openbagel.shapes.render import render
from openbagel.shapes.tasks import random_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="random scenes per condition (0-9 objects each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/shapes_detector.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scenes = [random_scene(rng, rng.randint(0, 9)) for _ in range(args.n)]
    images = [render(s) for s in scenes]
    results = {}
    print(f"{'condition':<24} {'accuracy':>9} {'errors':>7} {'ms/image':>9}")
    for name, perturb in CONDITIONS.items():
        noise_rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        errors = sum(detect(perturb(image, noise_rng)) != scene for scene, image in zip(scenes, images))
        ms = 1000 * (time.perf_counter() - start) / args.n
        results[name] = {"accuracy": 1 - errors / args.n, "errors": errors, "n": args.n, "ms_per_image": ms}
        print(f"{name:<24} {100 * (1 - errors / args.n):8.2f}% {errors:7d} {ms:9.2f}")
    with open(args.out, "w") as f:
        json.dump({"seed": args.seed, "conditions": results}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
