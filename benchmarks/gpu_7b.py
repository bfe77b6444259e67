"""The 7B-MoT configuration on a GPU: seconds per image, peak memory and MFU of text-to-image and edit.

Usage (random weights built directly on the device, no checkpoint on disk; one process per variant):
    python benchmarks/gpu_7b.py                                  # bagel-7b-mot, bf16, 1024², 50 steps
    python benchmarks/gpu_7b.py --compile --repeat 1             # ... and with the decoder layers compiled
    python benchmarks/gpu_7b.py --quantize torchao-int8          # or torchao-int4, torchao-fp8, bnb-int8, bnb-nf4
    python benchmarks/gpu_7b.py --quantize torchao-fp8 --compile --compiled-only --tasks t2i
    python benchmarks/gpu_7b.py --offload                        # decoder layers streamed from CPU memory
    python benchmarks/gpu_7b.py --config wide --device cpu --dtype fp32 --side 64 --steps 3   # smoke run
For each task it reports the median seconds per image (after one warm-up call; with --compile, again
with the decoder layers compiled, after a call that compiles them), the peak accelerator
memory (CUDA: max_memory_allocated; CPU: the process's resident high-water mark), the PSNR of its image
against the eager unquantised one (same seed: what compile or quantisation changes), the FLOPs of one whole
call as `torch.utils.flop_counter` counts them (prefill, denoising, VAE; with --quantize, counted before
quantising: the same work in the unquantised dtype), and MFU = FLOPs / seconds / peak,
where the peak is the card's dense bf16 figure (`--peak-tflops`, known for H100 / H200 / A100) or, on
CPU, the fp32 matmul peak measured in the same run. Issue 8's bar: 1024² text-to-image in <= 8 s on an H100.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GiB, PROMPT_EDIT, PROMPT_T2I, bench_config, bench_tokenizer, environment, measure,  # noqa: E402
                    peak_rss, report, reset_peak_rss, test_image)
from matmul_peak import peak_gflops  # noqa: E402

from openbagel.checkpoint import LoadedCheckpoint, init_random  # noqa: E402
from openbagel.inference.offload import offload_layers  # noqa: E402
from openbagel.inference.pipeline import BagelPipeline  # noqa: E402
from openbagel.inference.quantize import MODES, quantize  # noqa: E402
from openbagel.models import layers  # noqa: E402
from openbagel.models.bagel import Bagel  # noqa: E402
from openbagel.models.vae import AutoEncoder  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
DENSE_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def random_pipeline_on(cfg, device: torch.device, dtype: torch.dtype, offload: bool) -> BagelPipeline:
    """A randomly initialised model built in place (meta, then empty storage on the device, then init).

    With `offload` the layers move to CPU memory after the build (drawing 14.6 B random numbers on the
    GPU takes seconds, on the CPU over a minute); memory is measured after the build either way.
    """
    with torch.device("meta"):
        model, vae = Bagel(cfg).to(dtype), AutoEncoder(cfg.vae)
    model.to_empty(device=device)
    vae.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    init_random(model, generator=gen)
    with torch.no_grad():
        for module in vae.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for p in [*model.parameters(), *vae.parameters()]:
        p.requires_grad_(False)
    if offload:
        offload_layers(model, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    pipe = BagelPipeline(LoadedCheckpoint(cfg, model.eval(), vae.eval(), bench_tokenizer(cfg), Path(".")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def task_calls(pipe: BagelPipeline, side: int, steps: int) -> dict[str, Callable[[], object]]:
    """The two timed calls: text-to-image and edit at side x side, fixed seed."""
    settings = dict(num_inference_steps=steps, seed=0)
    return {
        "t2i": lambda: pipe.generate(PROMPT_T2I, height=side, width=side, **settings),
        "edit": lambda: pipe.edit(test_image(side), PROMPT_EDIT, **settings),
    }


def counted_call(call: Callable[[], object]) -> tuple[int, object]:
    """One call's FLOPs as FlopCounterMode counts them, and its output. The counter's SDPA formulas need
    equal query and K/V head counts, so K/V are expanded while counting (timed calls read grouped heads
    where a kernel can)."""
    with mock.patch.object(layers, "_fused_gqa", lambda q, masked: False), FlopCounterMode(display=False) as counter:
        out = call()
    return counter.get_total_flops(), out


def psnr_db(a: Image.Image, b: Image.Image) -> float:
    """PSNR of image a against image b (uint8 pixels); inf when identical."""
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * math.log10(255 ** 2 / mse), 2)


def card_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DENSE_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return value
    return None


def stage(message: str, since: float) -> None:
    """A progress line on stderr, so a run cut short by a time box still tells where its time went."""
    print(f"[{time.perf_counter() - since:7.1f} s] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bagel-7b-mot", help="a preset or benchmarks/common.py config")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quantize", choices=MODES, default=None)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--tasks", default="t2i,edit", help="comma-separated: t2i, edit")
    parser.add_argument("--compile", action="store_true",
                        help="time each task again with engine.compile_step (its first call compiles: compile_s)")
    parser.add_argument("--compiled-only", action="store_true",
                        help="with --compile: time only the compiled variant (saves device time)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense peak (default: known cards)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU smoke runs)")
    parser.add_argument("--out", default="benchmarks/gpu_7b.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; pass --device cpu for a smoke run at a small --config and --side")

    start = t0 = time.perf_counter()
    pipe = random_pipeline_on(bench_config(args.config), device, DTYPES[args.dtype], args.offload)
    build_s = time.perf_counter() - start
    stage(f"built {args.config} on {device}", t0)
    calls = task_calls(pipe, args.side, args.steps)
    tasks = args.tasks.split(",")
    flops: dict[str, int] = {}
    reference: dict[str, Image.Image] = {}  # the eager, unquantised image each variant is compared with
    quantize_s = None
    if args.quantize:  # FlopCounterMode does not see quantised kernels: count the same work before quantising
        for task in tasks:
            flops[task], out = counted_call(calls[task])
            reference[task] = out.images[0]
            stage(f"{task}: counted the unquantised call", t0)
        start = time.perf_counter()
        quantize(pipe.engine.model, args.quantize)
        quantize_s = round(time.perf_counter() - start, 1)
        stage(f"quantised ({args.quantize})", t0)
    card_peak = card_peak_tflops(device)
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    elif card_peak:
        peak, peak_source = card_peak, f"data sheet, {torch.cuda.get_device_name(device)}"
    else:
        peak, peak_source = peak_gflops(seconds_budget=0.5) / 1e3, "measured fp32 matmul"

    def reset_memory() -> None:
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else reset_peak_rss()

    def peak_memory() -> float:
        return (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()) / GiB

    rows = []
    for task in tasks:
        call = calls[task]
        # The warm-up runs eager: a compiled region first entered under FlopCounterMode (a dispatch mode) stays
        # eager afterwards, so an earlier task's compiled variant must not leak into this count.
        pipe.engine.compile_step = False
        if task in flops:
            if not args.compiled_only:
                call()  # the eager warm-up call
        else:
            flops[task], out = counted_call(call)  # the eager warm-up call, counted
            reference[task] = out.images[0]
        for compiled in ([True] if args.compiled_only else [False, True]) if args.compile else [False]:
            pipe.engine.compile_step = compiled
            start = time.perf_counter()
            if compiled:
                stage(f"{task}: compiling", t0)
                call()  # compiles the layers' halves around attention (shared by all layers) for this task's shapes
            compile_s = time.perf_counter() - start if compiled else None
            reset_memory()
            last: list = []
            stage(f"{task}: timing {'compiled' if compiled else 'eager'}", t0)
            timing = measure(lambda: last.append(call()), args.repeat, warmup=0)
            achieved = flops[task] / timing["median_s"] / 1e12
            rows.append({"task": task, "step": "compiled" if compiled else "eager", "side": args.side,
                         "steps": args.steps, "seconds": timing["median_s"], "peak_memory_gib": round(peak_memory(), 2),
                         "flop": flops[task], "tflop": round(flops[task] / 1e12, 2), "tflops": round(achieved, 1),
                         "mfu": round(achieved / peak, 3), "compile_s": compile_s and round(compile_s, 1),
                         "psnr_db": psnr_db(last[-1].images[0], reference[task]),
                         "timing": timing})
            print({k: v for k, v in rows[-1].items() if k != "timing"}, flush=True)  # survives a time-out
    variant = args.quantize or ("offload" if args.offload else args.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report(rows, ["task", "step", "side", "steps", "seconds", "peak_memory_gib", "tflop", "tflops", "mfu", "compile_s",
                  "psnr_db"],
           args.out,
           {"benchmark": "gpu_7b", "config": args.config, "variant": variant, "device": device_name,
            "peak_tflops": round(peak, 2), "peak_source": peak_source, "build_s": round(build_s, 1), "quantize_s": quantize_s,
            **environment(args.threads)})


if __name__ == "__main__":
    main()
