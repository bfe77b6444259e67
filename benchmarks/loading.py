"""Checkpoint loading: time and peak memory against the size on disk.

Usage: python benchmarks/loading.py [--configs tiny,shapes-tiny,mid] [--dtypes fp32,bf16] [--work DIR]
       python benchmarks/loading.py --configs wide        # 7B widths, 2 layers: a ~4.5 GB checkpoint
Random checkpoints are written once under --work; each load runs in a fresh process that reports the
wall time of `load_checkpoint`, then of reading one value from every 4 KiB page of every weight (a load
whose file and model dtypes agree stays memory-mapped (checkpoint.MappedSafetensors): its pages arrive on first use), and the
growth of its resident high-water mark (VmHWM) after both over the process after `import torch,
openbagel` (so the ratio to the file size is the loader's overhead).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(path: str, dtype: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from common import peak_rss, reset_peak_rss, rss

    from openbagel.checkpoint import load_checkpoint

    torch.set_num_threads(2)
    base = rss()
    reset_peak_rss()
    start = time.perf_counter()
    ck = load_checkpoint(path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    seconds = time.perf_counter() - start
    weights = [*ck.model.parameters(), *ck.vae.parameters()]
    for p in weights:  # page everything in: one value per 4 KiB page
        p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
    paged = time.perf_counter() - start
    params = sum(p.numel() for p in weights)
    print(json.dumps({"load_s": round(seconds, 3), "paged_in_s": round(paged, 3), "base_rss": base,
                      "peak_rss": peak_rss(), "params": params}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,shapes-tiny,mid")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--work", default="/tmp/openbagel-loading")
    parser.add_argument("--repeat", type=int, default=2, help="loads per checkpoint (the best is kept)")
    parser.add_argument("--out", default="benchmarks/loading.json")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    sys.path.insert(0, str(HERE))
    from common import GiB, bench_config, environment, random_pipeline, report

    rows = []
    for name in args.configs.split(","):
        path = Path(args.work) / name
        if not (path / "ema.safetensors").is_file():
            random_pipeline(bench_config(name), path)  # writes the checkpoint (and checks it loads)
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for dtype in args.dtypes.split(","):
            runs = [json.loads(subprocess.run([sys.executable, __file__, "--worker", str(path), dtype], check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])
                    for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["load_s"])
            grown = max(r["peak_rss"] - r["base_rss"] for r in runs)
            rows.append({"config": name, "dtype": dtype, "params_m": round(best["params"] / 1e6, 1),
                         "disk_gib": round(disk / GiB, 4), "load_s": best["load_s"], "paged_in_s": best["paged_in_s"],
                         "peak_growth_gib": round(grown / GiB, 4), "peak_over_disk": round(grown / disk, 2),
                         "load_mb_per_s": round(disk / 1e6 / best["paged_in_s"], 1),
                         "runs_s": [r["load_s"] for r in runs]})
    report(rows, ["config", "dtype", "params_m", "disk_gib", "load_s", "paged_in_s", "peak_growth_gib",
                  "peak_over_disk", "load_mb_per_s"], args.out, {"benchmark": "loading", **environment(2)})


if __name__ == "__main__":
    main()
