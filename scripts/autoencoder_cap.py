"""How many task scenes survive the autoencoder alone? The ceiling of every image score of the model.

Renders fresh source scenes (1-4 objects, the distribution of the evaluation's sources and captions),
encodes them (posterior mean, or a posterior sample with --sample, what an edit's input gets), decodes,
and reads the result back with the detector. Prints the exact-scene rate and what the misses were.
Usage: python scripts/autoencoder_cap.py [MODEL] [-n 300] [--seed 123] [--sample]
"""

import argparse
import random
from collections import Counter

import torch

from openbagel.inference.pipeline import BagelPipeline
from openbagel.processing import to_pil, to_tensor
from openbagel.shapes import detect, render
from openbagel.shapes.tasks import random_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--sample", action="store_true", help="decode a posterior sample, not the mean")
    args = parser.parse_args()
    vae = BagelPipeline.from_pretrained(args.model, device="cpu").engine.vae
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    misses: Counter[tuple[str, ...]] = Counter()
    exact = 0
    for _ in range(args.n):
        scene = random_scene(rng)
        x = to_tensor(render(scene))[None]
        with torch.no_grad():
            image = to_pil(vae.decode(vae.encode(x, sample=args.sample, generator=gen))[0])
        found = detect(image)
        exact += found == scene
        if found.background != scene.background:
            misses[("background", scene.background, found.background)] += 1
        want, got = {o.cell: o for o in scene.objects}, {o.cell: o for o in found.objects}
        for cell in sorted(set(want) | set(got)):
            w, g = want.get(cell), got.get(cell)
            if w is None or g is None:
                misses[("extra" if w is None else "missing", (w or g).size, (w or g).shape)] += 1
            else:
                for attr in ("shape", "color", "size"):
                    if getattr(w, attr) != getattr(g, attr):
                        misses[(attr, w.size, f"{getattr(w, attr)} -> {getattr(g, attr)}")] += 1
    print(f"exact scenes after encode + decode: {exact}/{args.n} = {exact / args.n:.1%}"
          f" ({'posterior sample' if args.sample else 'posterior mean'})")
    for what, count in misses.most_common():
        print(f"{count:4d}  {' / '.join(what)}")


if __name__ == "__main__":
    main()
