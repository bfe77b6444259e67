"""The embedded model: latency of each task at default settings, and batch-file throughput.

Usage: python benchmarks/embedded.py [MODEL_DIR] [--threads 2] [--repeat 3] [--tasks 16]
       python benchmarks/embedded.py --random-preset shapes-tiny     # a random model of the same shape
MODEL_DIR defaults to the embedded model (openbagel/weights/shapes-tiny). Latency: generate, edit,
understand and edit with thinking, one task per call, the checkpoint's default settings. Throughput:
`openbagel batch` files of `--tasks` generate (or edit) tasks run with max_batch 1, 4 and 16, in
images per second. A random model decodes until its token limit (it never closes a thought), so its
thinking latency is the worst case.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contention, bench_config, environment, measure, random_pipeline, report, test_image  # noqa: E402

from openbagel.inference.batch import run_batch_file  # noqa: E402
from openbagel.inference.pipeline import EMBEDDED_MODEL, BagelPipeline  # noqa: E402

PROMPT = "a red circle at the top left on a white background"
INSTRUCTION = "make the square blue"
QUESTION = "what color is the triangle?"


def task_file(directory: Path, kind: str, n: int, side: int) -> Path:
    """A batch file of n tasks of one kind (edits share one input image)."""
    test_image(side).save(directory / "input.png")
    lines = []
    for i in range(n):
        task = ({"task": "generate", "prompt": PROMPT} if kind == "generate"
                else {"task": "edit", "image": "input.png", "instruction": INSTRUCTION})
        lines.append(json.dumps({"id": f"{kind}-{i}", "seed": i, **task}))
    path = directory / f"{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=str(EMBEDDED_MODEL))
    parser.add_argument("--random-preset", help="benchmark a random checkpoint of this preset instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=16, help="tasks per batch file")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--out", default="benchmarks/embedded.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.random_preset:
            pipe, model = random_pipeline(bench_config(args.random_preset), tmp / "model"), f"random {args.random_preset}"
        else:
            pipe, model = BagelPipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32), args.model
            pipe.set_progress_bar_config(disable=True)
        side = pipe.config.default_image_size[0]
        image = test_image(side)
        calls = {
            "generate": lambda: pipe.generate(PROMPT, seed=0),
            "edit": lambda: pipe.edit(image, INSTRUCTION, seed=0),
            "understand": lambda: pipe.understand(image, QUESTION, seed=0),
            "think edit": lambda: pipe.edit(image, INSTRUCTION, think=True, seed=0),
        }
        rows = []
        for name, call in calls.items():
            m = measure(call, args.repeat)
            rows.append({"measure": "latency", "task": name, "seconds": m["median_s"], "contended": m["contended"],
                         "runs_s": m["all_s"], "other_cpu_s": m["other_cpu_s"]})
        for kind in ("generate", "edit"):
            path = task_file(tmp, kind, args.tasks, side)
            for b in (int(x) for x in args.batch_sizes.split(",")):
                with Contention() as c:
                    start = time.perf_counter()
                    results = run_batch_file(pipe, path, tmp / f"out-{kind}-{b}", max_batch=b)
                    seconds = time.perf_counter() - start
                errors = [r["error"] for r in results if "error" in r]
                if errors:
                    raise RuntimeError(f"batch {kind} x{b} failed: {errors[0]}")
                rows.append({"measure": "throughput", "task": kind, "batch": b, "seconds": round(seconds, 3),
                             "images_per_s": round(args.tasks / seconds, 2),
                             "contended": c.other_cpu_s > 0.1 * seconds + 0.05, "other_cpu_s": c.other_cpu_s})
    report(rows, ["measure", "task", "batch", "seconds", "images_per_s", "contended"], args.out,
           {"benchmark": "embedded", "model": model, "image_side": side, **environment(args.threads)})


if __name__ == "__main__":
    main()
