"""Training throughput on this machine: tokens/s, achieved GFLOP/s and the fraction of the matmul peak.

Usage: python benchmarks/train_throughput.py [--steps 6] [--threads 2] [--profile]
Runs the real `Trainer.train_step` (packing, VAE encode, forward, backward, clip, AdamW, EMA) on a
small random model and the synthetic stream. FLOPs are counted by `torch.utils.flop_counter` on one
step (matmuls, convolutions and attention, forward and backward); the peak comes from
`benchmarks/matmul_peak.json` (run matmul_peak.py first) or is measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from openbagel.config import PRESETS, LLMConfig, ViTConfig
from openbagel.data.packing import PackingConfig
from openbagel.train.recipes import tiny
from openbagel.train.trainer import Trainer

# A small model where matmuls dominate: width 256, 4 MoT layers, 2-layer ViT.
PRESETS["bench-small"] = replace(
    PRESETS["tiny"],
    llm=LLMConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096),
    vit=ViTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=8, image_size=512),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--peak", default="benchmarks/matmul_peak.json")
    parser.add_argument("--profile", action="store_true", help="print the torch.profiler table of one step")
    parser.add_argument("--out", default="benchmarks/train_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = tiny()
    cfg.model, cfg.progress, cfg.export_ema, cfg.steps = "bench-small", False, False, 10_000
    cfg.packing = PackingConfig(expected_num_tokens=args.tokens - 64, max_num_tokens=args.tokens,
                                max_num_tokens_per_sample=args.tokens, rows_per_batch=args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        trainer.train_step()  # warm-up
        with FlopCounterMode(display=False) as counter:
            trainer.train_step()
        flops_per_step = counter.get_total_flops()
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.train_step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        stats = [trainer.train_step() for _ in range(args.steps)]
    seconds = statistics.median(s.seconds for s in stats)
    tokens = statistics.median(s.tokens for s in stats)
    achieved = flops_per_step / seconds / 1e9
    peak_path = Path(args.peak)
    peak = json.loads(peak_path.read_text())["peak_gflops"] if peak_path.is_file() else None
    params = sum(p.numel() for p in trainer.model.parameters())
    result = {"model": "bench-small", "params": params, "threads": args.threads, "tokens_per_step": tokens,
              "seconds_per_step": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
              "gflop_per_step": round(flops_per_step / 1e9, 2), "achieved_gflops": round(achieved, 1),
              "peak_gflops": peak, "fraction_of_peak": round(achieved / peak, 3) if peak else None,
              "losses": [round(s.loss, 4) for s in stats]}
    for k, v in result.items():
        print(f"{k:>18}: {v}")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
