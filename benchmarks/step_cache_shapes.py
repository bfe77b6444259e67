"""Step caching on the embedded model, judged by the Shapes world: scores and time with it off and on.

Usage: python benchmarks/step_cache_shapes.py [-n 8] [--interval 2] [--order 1] [--warmup 2] [--final 1]
                                               [--kinds generate,edit] [--model DIR]
The same held-out tasks (same seed) run twice through the batch path: the default denoising loop,
then with `engine.step_cache` set. It prints every image category's score for both, the difference in
points, and the wall time of each whole evaluation (generation + scoring). The issue's bar: scores
within 2 points while the time drops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, report  # noqa: E402

from openbagel.inference.pipeline import BagelPipeline  # noqa: E402
from openbagel.inference.step_cache import StepCacheConfig  # noqa: E402
from openbagel.shapes.cli import think_modes_for  # noqa: E402
from openbagel.shapes.evaluate import evaluate, pipeline_runner  # noqa: E402

IMAGE_CATEGORIES = ("generate/full", "generate/partial_mean", "edit/mean", "edit/psnr_db",
                    "reason_edit+think/mean", "chat/all_turns")
IMAGE_KINDS = "generate,edit,reason_edit+think,chat"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=8, help="tasks per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="first steps always computed")
    parser.add_argument("--final", type=int, default=1, help="last steps always computed")
    parser.add_argument("--kinds", default=IMAGE_KINDS,
                        help=f"task kinds to score, as `openbagel eval shapes --kinds` (default: {IMAGE_KINDS})")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/step_cache_shapes.json")
    args = parser.parse_args()
    think_modes = think_modes_for(args.kinds)
    torch.set_num_threads(args.threads)
    pipe = BagelPipeline.from_pretrained(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    runs = {}
    for name, cache in (("off", None), ("on", StepCacheConfig(interval=args.interval, order=args.order,
                                                               warmup=args.warmup, final=args.final))):
        pipe.engine.step_cache = cache
        start = time.perf_counter()
        metrics = evaluate(pipeline_runner(pipe), n=args.n, seed=args.seed, think_modes=think_modes)["metrics"]
        runs[name] = {"metrics": metrics, "seconds": time.perf_counter() - start}
    pipe.engine.step_cache = None
    rows = []
    for key in (*IMAGE_CATEGORIES, "seconds"):
        off = runs["off"]["seconds"] if key == "seconds" else runs["off"]["metrics"].get(key)
        on = runs["on"]["seconds"] if key == "seconds" else runs["on"]["metrics"].get(key)
        if off is None or on is None:
            continue
        scale = 1 if key in ("seconds", "edit/psnr_db") else 100  # scores in points
        rows.append({"metric": key, "off": round(off * scale, 2), "on": round(on * scale, 2),
                     "difference": round((on - off) * scale, 2)})
    report(rows, ["metric", "off", "on", "difference"], args.out,
           {"benchmark": "step_cache_shapes", "n": args.n, "seed": args.seed, "kinds": args.kinds.split(","),
            "interval": args.interval, "order": args.order, "warmup": args.warmup, "final": args.final,
            **environment(args.threads)})


if __name__ == "__main__":
    main()
