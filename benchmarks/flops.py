"""FLOPs of a denoising step (from the shapes), achieved GFLOP/s of the sampler loop, and the matmul peak.

Usage: python benchmarks/flops.py [--configs tiny,mid] [--side 128] [--steps 6] [--threads 2]
       python benchmarks/flops.py --configs wide --side 256 --steps 5     # the wide slice, ~4 GiB
       python benchmarks/flops.py --phases --configs wide --side 256 --steps 5 --out benchmarks/flops_phases_wide.json
       python benchmarks/flops.py --compile --configs wide --side 256 --steps 5 --out benchmarks/flops_wide_compiled.json
For a text-to-image (2 branches) and an edit (3 branches) it counts, per branch, the FLOPs the
official code would execute for one step (matmuls of both experts' projections and MLPs, attention
over context + block, vae2llm / llm2vae), times our whole denoising loop, and divides. The same run
measures the fp32 matmul peak (benchmarks/matmul_peak.py), so the ratio is our distance to the limit.
`torch.utils.flop_counter` also counts what we really execute (padding included) as a cross-check,
and the VAE decode is counted and timed the same way. `--compile` times the loop with
`engine.compile_step` (compiled once per task in the untimed warm-up call).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from openbagel.inference.sampler import cfg_active, timesteps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PROMPT_EDIT, PROMPT_T2I, bench_config, environment, measure, random_pipeline,  # noqa: E402
                    report, task_jobs, test_image)
from matmul_peak import peak_gflops  # noqa: E402


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


# Engine entry points, one per phase of a pipeline call; none of them calls another.
PHASES = {"vae.encode": "vae encode", "model.embed_vit": "vit", "_prefill_image_rows": "image prefill",
          "prefill_text": "text prefill", "generate_images": "denoise", "decode_latents": "vae decode"}


def phase_breakdown(pipe, call, repeat: int) -> dict[str, dict[str, float]]:
    """Executed FLOPs (one counted call) and median seconds (`repeat` timed calls) of each phase of
    `call`; `other` is the rest of the wall time (tokenising, image conversion, Python glue)."""
    counting = {"on": False}
    flops: dict[str, float] = defaultdict(float)
    seconds: dict[str, float] = defaultdict(float)

    def wrap(owner, attr: str, phase: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            if counting["on"]:
                with FlopCounterMode(display=False) as counter:
                    out = inner(*args, **kwargs)
                flops[phase] += counter.get_total_flops()
            else:
                out = inner(*args, **kwargs)
            seconds[phase] += time.perf_counter() - start
            return out

        object.__setattr__(owner, attr, timed)  # an instance attribute shadows the method until removed
        wrapped.append((owner, attr))

    wrapped: list[tuple[object, str]] = []
    for path, phase in PHASES.items():
        *parents, attr = path.split(".")
        owner = pipe.engine
        for name in parents:
            owner = getattr(owner, name)
        wrap(owner, attr, phase)
    runs = []
    try:
        counting["on"] = True
        call()
        counting["on"] = False
        for _ in range(repeat):
            seconds.clear()
            start = time.perf_counter()
            call()
            runs.append({**seconds, "total": time.perf_counter() - start})
    finally:
        for owner, attr in wrapped:
            object.__delattr__(owner, attr)
    runs.sort(key=lambda r: r["total"])
    median = runs[len(runs) // 2]
    out = {phase: {"gflop": flops[phase] / 1e9, "s": median.get(phase, 0.0)} for phase in dict.fromkeys(PHASES.values())}
    out["other"] = {"gflop": 0.0, "s": median["total"] - sum(v["s"] for v in out.values())}
    out["total"] = {"gflop": sum(flops.values()) / 1e9, "s": median["total"]}
    return out


def phase_rows(cfg_name: str, pipe, side: int, steps: int, repeat: int, peak: float) -> list[dict]:
    """One row per phase of a whole text-to-image and a whole edit call."""
    calls = {"t2i": lambda: pipe.generate(PROMPT_T2I, height=side, width=side, seed=0, num_inference_steps=steps),
             "edit": lambda: pipe.edit(test_image(side), PROMPT_EDIT, seed=0, num_inference_steps=steps)}
    rows = []
    for task, call in calls.items():
        for phase, v in phase_breakdown(pipe, call, repeat).items():
            if v["s"] < 1e-4 and not v["gflop"]:
                continue
            rate = v["gflop"] / v["s"] if v["s"] else 0.0
            rows.append({"config": cfg_name, "task": task, "phase": phase, "gflop": round(v["gflop"], 2),
                         "seconds": round(v["s"], 3), "gflops": round(rate, 1),
                         "fraction_of_peak": round(rate / peak, 3) if v["gflop"] else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/flops.json")
    parser.add_argument("--compile", action="store_true", help="time the loop with engine.compile_step")
    parser.add_argument("--phases", action="store_true",
                        help="instead: FLOPs, seconds and fraction of peak of every phase of whole t2i / edit calls")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = peak_gflops(seconds_budget=0.5)
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            cfg = bench_config(name)
            pipe = random_pipeline(cfg, Path(tmp) / name)
            if args.phases:
                rows += phase_rows(name, pipe, args.side, args.steps, args.repeat, peak)
                continue
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
                if args.compile:  # a fresh compile per task: the context length differs between tasks
                    torch._dynamo.reset()
                    eng.compile_step = True
                t_loop = measure(lambda: eng.generate_images(jobs), args.repeat)
                eng.compile_step = False
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
    if args.phases:
        report(rows, ["config", "task", "phase", "gflop", "seconds", "gflops", "fraction_of_peak"], args.out,
               {"benchmark": "flops --phases", "side": args.side, "steps": args.steps, "peak_gflops": round(peak, 1),
                **environment(args.threads)})
        return
    report(rows, ["config", "task", "latents", "step_gflop_per_branch", "loop_gflop", "executed_gflop", "loop_s",
                  "loop_gflops", "fraction_of_peak", "vae_gflops", "contended"], args.out,
           {"benchmark": "flops", "side": args.side, "compile": args.compile, "peak_gflops": round(peak, 1),
            **environment(args.threads)})


if __name__ == "__main__":
    main()
