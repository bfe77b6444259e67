"""The full-size 7B-MoT on this CPU, quantised to int8 (or int4) while it loads: what `--quantize int8`
gives a machine without a GPU. Load time and memory against the file's size, the time to the first answer token
and per token after it, and the time per denoising step of a text-to-image call.

Usage:
    python benchmarks/cpu_7b.py --work /tmp/openbagel-7b                # writes a 29 GB random bf16 checkpoint once
    python benchmarks/cpu_7b.py --work /tmp/openbagel-7b --quantize int4 --out benchmarks/cpu_7b_int4.json
    python benchmarks/cpu_7b.py --config wide --work /tmp/obw --side 64  # the same path at 2 layers, seconds

The model fits this 24 GiB machine in no float dtype (59 GB fp32, 29 GB bf16), so the checkpoint is written
a tensor at a time, in the safetensors layout, from a pool of N(0, 0.02) values (norm weights 1, biases 0):
random weights in the official file layout, bf16 as the released `ema.safetensors`. The measurement runs
in a fresh process (`--worker`), so its resident high-water mark (VmHWM) is the load's and the calls'.
VmHWM counts the file pages the load maps as well; `anon_gib` is the memory the process itself holds.
`--memory-limit-gib N` runs the worker in a Linux memory cgroup of N GiB (page cache included, as a machine
of that size would count it), to show the model runs there; it needs a writable cgroup hierarchy (root).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GiB, PROMPT_T2I, anon_rss, bench_config, bench_tokenizer, environment, peak_rss,  # noqa: E402
                    report, test_image)

from openbagel.checkpoint import AE_FILE, EMA_FILE  # noqa: E402
from openbagel.config import BagelConfig  # noqa: E402
from openbagel.models.bagel import Bagel  # noqa: E402
from openbagel.models.vae import AutoEncoder  # noqa: E402

POOL = 2**24 + 43  # values cycled through; a prime length, so rows of any width start at different places


def write_streamed(shapes: dict[str, torch.Size], path: Path, seed: int = 0) -> None:
    """A bf16 safetensors file of random weights, written one tensor at a time (never all in memory)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = shape.numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=gen) * 0.02).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key, shape in shapes.items():
            n = shape.numel()
            if key.endswith(".bias"):
                fill = torch.zeros(n, dtype=torch.bfloat16)
            elif "norm" in key:
                fill = torch.ones(n, dtype=torch.bfloat16)
            else:
                start = int(torch.randint(POOL, (1,), generator=gen))
                fill = pool.roll(-start).repeat(n // POOL + 1)[:n]
            f.write(fill.view(torch.int16).numpy().tobytes())
    tmp.replace(path)


def write_random_checkpoint(cfg: BagelConfig, directory: Path) -> Path:
    """The official layout: config files, a small tokenizer, ema.safetensors (streamed), ae.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    cfg.save(directory)
    bench_tokenizer(cfg).save(directory)
    with torch.device("meta"):
        state = Bagel(cfg).state_dict()
    if not all(v.is_floating_point() for v in state.values()):
        raise SystemExit("the model holds integer tensors: write_streamed writes every tensor as bf16")
    shapes = {k: v.shape for k, v in state.items()}
    save_file(AutoEncoder(cfg.vae).state_dict(), str(directory / AE_FILE), metadata={"format": "pt"})
    write_streamed(shapes, directory / EMA_FILE)
    return directory


def anon_gib() -> float:
    return round(anon_rss() / GiB, 2)


def worker(args: argparse.Namespace) -> None:
    """Load quantised, answer one question, decode tokens, draw one image; print one JSON line."""
    from openbagel.inference.engine import TextParams
    from openbagel.inference.pipeline import BagelPipeline

    torch.set_num_threads(args.threads)  # glibc's default malloc, as a user gets (allocator.py stays opt-in)
    row: dict = {"config": args.config, "quantize": args.quantize, "dtype": "fp32",
                 "disk_gib": round(sum(f.stat().st_size for f in Path(args.work).glob("*.safetensors")) / GiB, 2)}
    start = time.perf_counter()
    pipe = BagelPipeline.from_pretrained(args.work, device="cpu", dtype="fp32", quantize=args.quantize)
    pipe.set_progress_bar_config(disable=True)
    row.update(load_s=round(time.perf_counter() - start, 1), load_peak_gib=round(peak_rss() / GiB, 2),
               load_anon_gib=anon_gib())

    start = time.perf_counter()
    pipe.understand(test_image(224), "What is in the picture?", max_new_tokens=1)
    row["first_token_s"] = round(time.perf_counter() - start, 1)  # the prompt's prefill and one token

    # Decoding timed at the engine, which reports every step (random weights write ids the small
    # benchmark tokenizer cannot spell, so text callbacks skip steps).
    engine, stamps = pipe.engine, []
    context = engine.new_cache(1)
    engine.prefill_text(context, [pipe.tokenizer.text_block("What is in the picture?")])
    ids = engine.decode(context, TextParams(max_new_tokens=args.tokens),
                        on_tokens=lambda _: stamps.append(time.perf_counter()))
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    row.update(answer_tokens=len(ids[0]), per_token_s=round(gaps[len(gaps) // 2], 3) if gaps else None)

    steps: list[float] = []
    start = time.perf_counter()

    def step_end(pipe_, step, t, kwargs):
        steps.append(time.perf_counter())
        return kwargs

    pipe.generate(PROMPT_T2I, height=args.side, width=args.side, num_inference_steps=args.timesteps, seed=0,
                  callback_on_step_end=step_end)
    row.update(side=args.side, denoise_steps=len(steps), t2i_s=round(time.perf_counter() - start, 4),
               per_step_s=round((steps[-1] - steps[0]) / (len(steps) - 1), 4) if len(steps) > 1 else None,
               peak_gib=round(peak_rss() / GiB, 2), anon_gib=anon_gib())
    print(json.dumps(row))


CGROUP_V2, CGROUP_V1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")


def memory_cgroup(limit_gib: float) -> tuple[Path, str]:
    """A new memory cgroup capped at `limit_gib` and the name of its peak-usage file (v2 or v1)."""
    v2 = (CGROUP_V2 / "cgroup.controllers").is_file()
    group = (CGROUP_V2 if v2 else CGROUP_V1) / f"openbagel-cpu-7b-{time.time_ns()}"
    try:
        group.mkdir()
        (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(int(limit_gib * GiB)))
    except OSError as exc:
        if group.is_dir():
            group.rmdir()
        sys.exit(f"--memory-limit-gib needs a writable memory cgroup ({group.parent}; on cgroup v2 with +memory "
                 f"in the parent's cgroup.subtree_control): {exc}")
    swap = group / ("memory.swap.max" if v2 else "memory.memsw.limit_in_bytes")
    if swap.is_file():  # no swapping out of the limit (v1: memory + swap capped at the same size)
        swap.write_text("0" if v2 else str(int(limit_gib * GiB)))
    return group, "memory.peak" if v2 else "memory.max_usage_in_bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bagel-7b-mot", help="bagel-7b-mot (full size) or wide (2 layers)")
    parser.add_argument("--work", default="/tmp/openbagel-7b", help="where the random checkpoint is written once")
    parser.add_argument("--quantize", default="int8", choices=("int8", "int4"), help="our CPU weight formats")
    parser.add_argument("--tokens", type=int, default=8, help="answer tokens to decode")
    parser.add_argument("--side", type=int, default=256, help="text-to-image side in pixels")
    parser.add_argument("--timesteps", type=int, default=3, help="timesteps (N timesteps = N-1 denoising steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="run the worker in a memory cgroup of this size (Linux, root)")
    parser.add_argument("--out", default=None, help="default benchmarks/cpu_7b_<config>_<quantize>[_<N>gib].json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    work = Path(args.work)
    if not (work / EMA_FILE).is_file():
        start = time.perf_counter()
        write_random_checkpoint(bench_config(args.config), work)
        print(f"wrote {work} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    group, peak_file = memory_cgroup(args.memory_limit_gib) if args.memory_limit_gib else (None, "")
    join = None if group is None else lambda: (group / "cgroup.procs").write_text(str(os.getpid()))
    try:
        run = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], capture_output=True, text=True,
                             preexec_fn=join)
        peak_path = None if group is None else group / peak_file
        peak = round(int(peak_path.read_text()) / GiB, 2) if peak_path and peak_path.is_file() else None
    finally:
        if group is not None:
            group.rmdir()
    if run.returncode:
        killed = ", killed: out of memory?" if run.returncode < 0 else ""
        sys.exit(f"worker failed ({run.returncode}{killed}):\n{run.stderr[-3000:]}")
    row = json.loads(run.stdout.strip().splitlines()[-1])
    row.update(memory_limit_gib=args.memory_limit_gib, cgroup_peak_gib=peak)
    columns = ["config", "quantize", "memory_limit_gib", "cgroup_peak_gib", "disk_gib", "load_s", "load_peak_gib",
               "load_anon_gib", "first_token_s", "per_token_s", "side", "per_step_s", "t2i_s", "peak_gib", "anon_gib"]
    limit = f"_{args.memory_limit_gib:g}gib" if args.memory_limit_gib else ""
    report([row], columns, args.out or Path(__file__).parent / f"cpu_7b_{args.config}_{args.quantize}{limit}.json",
           environment(args.threads))


if __name__ == "__main__":
    main()
