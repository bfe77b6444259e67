"""Measured fp32 matmul peak of this machine (GFLOP/s), the yardstick for training and inference efficiency.

Usage: python benchmarks/matmul_peak.py [--threads 2] [--out benchmarks/matmul_peak.json]
Times square and transformer-shaped matmuls after a warm-up with both CPU kernels torch offers: MKL
(`torch.mm`, what `F.linear` runs) and oneDNN over a prepacked weight (what the inference engine runs on
CPU, `openbagel/inference/onednn.py`); prints a table and writes JSON with the best rate as `peak_gflops`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 4096), (2048, 4096, 1024)]


KERNELS = ("mkl", "onednn") if torch.backends.mkldnn.is_available() else ("mkl",)


def gflops(m: int, k: int, n: int, seconds_budget: float = 1.0, kernel: str = "mkl") -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    if kernel == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), m)

        def run() -> None:
            torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    else:
        out = torch.empty(m, n)

        def run() -> None:
            torch.mm(a, b, out=out)
    for _ in range(3):
        run()
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds_budget:
        run()
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


def peak_gflops(seconds_budget: float = 1.0) -> float:
    """The best rate over every shape and kernel."""
    return max(gflops(m, k, n, seconds_budget, kernel) for m, k, n in SHAPES for kernel in KERNELS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/matmul_peak.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [{"m": m, "k": k, "n": n, "kernel": kernel, "gflops": round(gflops(m, k, n, kernel=kernel), 1)}
            for m, k, n in SHAPES for kernel in KERNELS]
    print(f"fp32 matmul, {args.threads} threads, torch {torch.__version__}")
    print(f"{'m':>6} {'k':>6} {'n':>6} {'kernel':>7} {'GFLOP/s':>9}")
    for r in rows:
        print(f"{r['m']:>6} {r['k']:>6} {r['n']:>6} {r['kernel']:>7} {r['gflops']:>9.1f}")
    peak = max(r["gflops"] for r in rows)
    print(f"peak {peak:.1f} GFLOP/s")
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows, "peak_gflops": peak}, f, indent=2)


if __name__ == "__main__":
    main()
