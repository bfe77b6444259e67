"""Where the time of one 7B-MoT call goes on a GPU: PyTorch's profiler table, kernels sorted by CUDA time.

Usage (random weights built on the card, as benchmarks/gpu_7b.py):
    python benchmarks/gpu_profile.py                      # t2i, 1024², 10 steps, bf16
    python benchmarks/gpu_profile.py --task edit --steps 5
    python benchmarks/gpu_profile.py --compile            # with the decoder layers compiled
    python benchmarks/gpu_profile.py --config tiny --device cpu --dtype fp32 --side 64 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_config  # noqa: E402
from gpu_7b import DTYPES, random_pipeline_on, task_calls  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bagel-7b-mot")
    parser.add_argument("--task", choices=("t2i", "edit"), default="t2i")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=25, help="rows of the table")
    parser.add_argument("--compile", action="store_true", help="profile with engine.compile_step (compiled in the warm-up)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; pass --device cpu for a smoke run at a small --config and --side")
    on_gpu = device.type == "cuda"
    pipe = random_pipeline_on(bench_config(args.config), device, DTYPES[args.dtype], offload=False)
    pipe.engine.compile_step = args.compile
    call = task_calls(pipe, args.side, args.steps)[args.task]
    call()  # warm-up: kernel selection, caches, compilation
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        call()
        if on_gpu:
            torch.cuda.synchronize()
    sort_by = "cuda_time_total" if on_gpu else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
