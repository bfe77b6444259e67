"""FLOPs of a denoising step (from the shapes), achieved GFLOP/s of the sampler loop, and the matmul peak.

Usage: python benchmarks/flops.py [--configs tiny,mid] [--side 128] [--steps 6] [--threads 2]
       python benchmarks/flops.py --configs wide --side 256 --steps 5     # the wide slice, ~4 GiB
For a text-to-image (2 branches) and an edit (3 branches) it counts, per branch, the FLOPs the
official code would execute for one step (matmuls of both experts' projections and MLPs, attention
over context + block, vae2llm / llm2vae), times our whole denoising loop, and divides. The same run
measures the fp32 matmul peak (benchmarks/matmul_peak.py), so the ratio is our distance to the limit.
`torch.utils.flop_counter` also counts what we really execute (padding included) as a cross-check,
and the VAE decode is counted and timed the same way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from openbagel.inference.sampler import cfg_active, timesteps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_config, environment, measure, random_pipeline, report, task_jobs  # noqa: E402
from matmul_peak import SHAPES, gflops  # noqa: E402


def branch_step_flops(cfg, latents: int, context: int) -> dict[str, int]:
    """FLOPs of one branch at one step: L = latents + 2 query tokens against `context` cached ones."""
    llm = cfg.llm
    H, D, Hq, Hkv, I = llm.hidden_size, llm.head_dim, llm.num_attention_heads, llm.num_key_value_heads, llm.intermediate_size
    L = latents + 2
    proj = 2 * L * H * (Hq * D + 2 * Hkv * D) + 2 * L * Hq * D * H
    mlp = 2 * L * 3 * H * I
    attn = 4 * Hq * L * (context + L) * D
    head = 2 * latents * H * cfg.patch_latent_dim  # llm2vae
    layers = llm.num_hidden_layers
    return {"linear": layers * (proj + mlp) + head, "attention": layers * attn, "total": layers * (proj + mlp + attn) + head}


def embed_flops(cfg, latents: int) -> int:
    """Per step and job, shared by the branches: vae2llm and the timestep MLP."""
    H = cfg.llm.hidden_size
    return 2 * latents * cfg.patch_latent_dim * H + 2 * (256 * H + H * H)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/flops.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = max(gflops(m, k, n, seconds_budget=0.5) for m, k, n in SHAPES)
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            cfg = bench_config(name)
            pipe = random_pipeline(cfg, Path(tmp) / name)
            eng = pipe.engine
            for task, jobs in task_jobs(pipe, args.side, args.steps).items():
                job = jobs[0]
                latents = (job.height // cfg.latent_downsample) * (job.width // cfg.latent_downsample)
                contexts = {"cond": job.cond_ctx}
                if job.params.uses_text_cfg:
                    contexts["text"] = job.text_ctx
                if job.params.uses_img_cfg and not job.img_ctx_is_cond:
                    contexts["img"] = job.img_ctx
                ctx_len = {b: int(c.valid[r].sum()) for b, (c, r) in contexts.items()}
                per_branch = {b: branch_step_flops(cfg, latents, n) for b, n in ctx_len.items()}
                # Steps outside the guidance interval run the conditional branch only.
                ts = timesteps(args.steps, job.params.timestep_shift)[:-1]
                guided = sum(cfg_active(float(t), job.params.cfg_interval) for t in ts)
                loop_flops = (len(ts) * (per_branch["cond"]["total"] + embed_flops(cfg, latents))
                              + guided * sum(f["total"] for b, f in per_branch.items() if b != "cond"))
                with FlopCounterMode(display=False) as counter:
                    latent = eng.generate_images(jobs)[0]
                executed = counter.get_total_flops()
                t_loop = measure(lambda: eng.generate_images(jobs), args.repeat)
                with FlopCounterMode(display=False) as counter:
                    eng.decode_latents(latent, job.height, job.width)
                vae_flops = counter.get_total_flops()
                t_vae = measure(lambda: eng.decode_latents(latent, job.height, job.width), args.repeat)
                achieved = loop_flops / t_loop["median_s"] / 1e9
                rows.append({
                    "config": name, "task": task, "latents": latents, "context": ctx_len,
                    "step_gflop_per_branch": {b: round(f["total"] / 1e9, 4) for b, f in per_branch.items()},
                    "attention_share": round(sum(f["attention"] for f in per_branch.values())
                                             / sum(f["total"] for f in per_branch.values()), 3),
                    "steps": len(ts), "guided_steps": guided, "loop_gflop": round(loop_flops / 1e9, 3),
                    "executed_gflop": round(executed / 1e9, 3), "loop_s": t_loop["median_s"],
                    "loop_gflops": round(achieved, 1), "peak_gflops": round(peak, 1),
                    "fraction_of_peak": round(achieved / peak, 3),
                    "vae_decode_gflop": round(vae_flops / 1e9, 3), "vae_decode_s": t_vae["median_s"],
                    "vae_gflops": round(vae_flops / t_vae["median_s"] / 1e9, 1),
                    "contended": t_loop["contended"] or t_vae["contended"], "loop": t_loop, "vae": t_vae,
                })
    report(rows, ["config", "task", "latents", "step_gflop_per_branch", "loop_gflop", "executed_gflop", "loop_s",
                  "loop_gflops", "fraction_of_peak", "vae_gflops", "contended"], args.out,
           {"benchmark": "flops", "side": args.side, "peak_gflops": round(peak, 1), **environment(args.threads)})


if __name__ == "__main__":
    main()
