"""Guidance branches in one batched forward vs one forward per branch: same result, speed-up.

Usage: python benchmarks/batched_guidance.py [--configs tiny,mid] [--side 128] [--steps 10] [--threads 2]
Times the denoising loop (`Engine.generate_images`) of a text-to-image (cond + text guidance) and an
edit (cond + text + image guidance) on the exact jobs the pipeline builds, with
`engine.batch_guidance` on and off, and checks that both give the same latents.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_config, environment, measure, random_pipeline, report, task_jobs  # noqa: E402


def run(pipe, jobs: list, batched: bool) -> list[torch.Tensor]:
    pipe.engine.batch_guidance = batched
    try:
        return pipe.engine.generate_images(jobs)
    finally:
        pipe.engine.batch_guidance = True


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/batched_guidance.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            pipe = random_pipeline(bench_config(name), Path(tmp) / name)
            for task, jobs in task_jobs(pipe, args.side, args.steps).items():
                same = max_rel_diff(run(pipe, jobs, True), run(pipe, jobs, False))
                batched = measure(lambda: run(pipe, jobs, True), args.repeat)
                one_by_one = measure(lambda: run(pipe, jobs, False), args.repeat)
                rows.append({"config": name, "task": task, "branches": 3 if task == "edit" else 2,
                             "steps": args.steps - 1, "batched_s": batched["median_s"],
                             "one_by_one_s": one_by_one["median_s"],
                             "speedup": round(one_by_one["median_s"] / batched["median_s"], 2),
                             "max_rel_diff": float(f"{same:.2e}"),
                             "contended": batched["contended"] or one_by_one["contended"],
                             "batched": batched, "one_by_one": one_by_one})
    report(rows, ["config", "task", "branches", "steps", "batched_s", "one_by_one_s", "speedup", "max_rel_diff",
                  "contended"], args.out, {"benchmark": "batched_guidance", "side": args.side,
                                           **environment(args.threads)})


if __name__ == "__main__":
    main()
