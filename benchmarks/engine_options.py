"""Opt-in engine options against the default denoising loop: torch.compile, step caching, int8 weights.

Usage: python benchmarks/engine_options.py [--configs tiny,mid] [--side 128] [--steps 20] [--threads 2]
       python benchmarks/engine_options.py --skip compile       # without the (slow on CPU) compile
For a text-to-image and an edit on the jobs the pipeline builds, each option reports the denoising
loop's time (median after a warm-up; compile's first call, which compiles, is reported separately),
its speed-up, how many model forwards ran, and the quality against the default loop: relative L2 of
the final latent and the max / mean absolute difference of the decoded 8-bit images. int8 also
reports the language model's weight bytes. int8 runs last (it replaces the model's Linear layers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GiB, bench_config, environment, measure, random_pipeline, report, task_jobs  # noqa: E402

from openbagel.inference.quantize import quantize, weight_bytes  # noqa: E402
from openbagel.inference.step_cache import StepCacheConfig  # noqa: E402

STEP_CACHES = {
    "cache-taylor1-every2": StepCacheConfig(interval=2, order=1),
    "cache-taylor1-every3": StepCacheConfig(interval=3, order=1),
    "cache-taylor2-every2": StepCacheConfig(interval=2, order=2),
    "cache-reuse-every2": StepCacheConfig(interval=2, order=0),
    "cache-teacache-0.3": StepCacheConfig(threshold=0.3, order=1),
}


def count_forwards(pipe, fn) -> tuple[object, int]:
    calls = []
    hook = pipe.engine.model.language_model.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        return fn(), len(calls)
    finally:
        hook.remove()


def quality(pipe, job, latent: torch.Tensor, reference: torch.Tensor) -> dict:
    def pixels(x):
        return ((pipe.engine.decode_latents(x, job.height, job.width) * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)

    diff = (pixels(latent).int() - pixels(reference).int()).abs().float()
    return {"latent_rel_err": float(f"{float((latent - reference).norm() / reference.norm()):.2e}"),
            "pixel_max_diff": int(diff.max()), "pixel_mean_diff": round(float(diff.mean()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma list of: compile, cache, int8")
    parser.add_argument("--out", default="benchmarks/engine_options.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            pipe = random_pipeline(bench_config(name), Path(tmp) / name)
            eng = pipe.engine
            all_jobs = task_jobs(pipe, args.side, args.steps)
            reference = {task: eng.generate_images(jobs)[0] for task, jobs in all_jobs.items()}
            base = {task: measure(lambda: eng.generate_images(jobs), args.repeat) for task, jobs in all_jobs.items()}

            def record(option: str, task: str, m: dict, **extra) -> None:
                jobs = all_jobs[task]
                latent, forwards = count_forwards(pipe, lambda: eng.generate_images(jobs)[0])
                rows.append({"config": name, "option": option, "task": task, "loop_s": m["median_s"],
                             "speedup": round(base[task]["median_s"] / m["median_s"], 2), "forwards": forwards,
                             **quality(pipe, jobs[0], latent, reference[task]),
                             "contended": m["contended"] or base[task]["contended"], **extra, "timing": m})
                print(name, option, task, m["median_s"], "s", flush=True)

            for task in all_jobs:
                record("default", task, base[task])
            if "cache" not in skip:
                for option, cache in STEP_CACHES.items():
                    eng.step_cache = cache
                    for task, jobs in all_jobs.items():
                        record(option, task, measure(lambda: eng.generate_images(jobs), args.repeat))
                    eng.step_cache = None
            if "compile" not in skip:
                eng.compile_step, eng._compiled_layers = True, None
                for task, jobs in all_jobs.items():
                    start = time.perf_counter()
                    eng.generate_images(jobs)  # compiles (once per shape signature)
                    first = round(time.perf_counter() - start, 2)
                    record("compile", task, measure(lambda: eng.generate_images(jobs), args.repeat),
                           first_call_s=first)
                eng.compile_step, eng._compiled_layers = False, None
            if "int8" not in skip:
                llm = eng.model.language_model
                before = weight_bytes(llm)
                quantize(eng.model, "int8")
                after = weight_bytes(llm)
                for task, jobs in all_jobs.items():
                    record("int8", task, measure(lambda: eng.generate_images(jobs), args.repeat),
                           llm_weights_gib=round(after / GiB, 4), llm_weights_fp32_gib=round(before / GiB, 4))
    report(rows, ["config", "option", "task", "loop_s", "speedup", "forwards", "latent_rel_err", "pixel_max_diff",
                  "pixel_mean_diff", "contended"], args.out,
           {"benchmark": "engine_options", "side": args.side, "steps": args.steps, **environment(args.threads)})


if __name__ == "__main__":
    main()
