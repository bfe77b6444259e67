"""Measured fp32 matmul peak of this machine (GFLOP/s), the yardstick for training efficiency.

Usage: python benchmarks/matmul_peak.py [--threads 2] [--out benchmarks/matmul_peak.json]
Times square and transformer-shaped matmuls after a warm-up; prints a table and writes JSON with the
best rate as `peak_gflops`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 4096), (2048, 4096, 1024)]


def gflops(m: int, k: int, n: int, seconds_budget: float = 1.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds_budget:
        torch.mm(a, b, out=out)
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/matmul_peak.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [{"m": m, "k": k, "n": n, "gflops": round(gflops(m, k, n), 1)} for m, k, n in SHAPES]
    print(f"fp32 matmul, {args.threads} threads, torch {torch.__version__}")
    print(f"{'m':>6} {'k':>6} {'n':>6} {'GFLOP/s':>9}")
    for r in rows:
        print(f"{r['m']:>6} {r['k']:>6} {r['n']:>6} {r['gflops']:>9.1f}")
    peak = max(r["gflops"] for r in rows)
    print(f"peak {peak:.1f} GFLOP/s")
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows, "peak_gflops": peak}, f, indent=2)


if __name__ == "__main__":
    main()
