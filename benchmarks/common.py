"""Shared pieces of the benchmarks: model configs, random pipelines, timing, memory, contention, output.

Every benchmark prints a table and writes JSON; each timing records how much CPU other processes used
meanwhile (`other_cpu_s`), so a number taken on a loaded machine says so.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from openbagel.config import BagelConfig, LLMConfig, ViTConfig, preset

PROMPT_T2I = "A red circle on a blue background."
PROMPT_EDIT = "Make the circle green."
TOKENIZER_TEXTS = ["a red circle at the top left on a white background", "make the square blue",
                   "what color is the triangle?", "remove the diamond", "think about the layout, then draw."] * 10


def bench_config(name: str) -> BagelConfig:
    """tiny (unit-test size), mid (width 512, 4 layers), wide (7B widths, 2 layers, small vocab), or a preset."""
    if name == "mid":
        return replace(preset("tiny"), llm=LLMConfig(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096))
    if name == "wide":
        return replace(preset("bagel-7b-mot"),
                       llm=replace(preset("bagel-7b-mot").llm, num_hidden_layers=2, vocab_size=1024),
                       vit=ViTConfig(num_hidden_layers=2), default_image_size=(256, 256),
                       think_system_prompts=preset("tiny").think_system_prompts,
                       extra_special_tokens=("<think>", "</think>"))
    return preset(name)


def bench_tokenizer(cfg: BagelConfig):
    """A small BPE tokenizer trained on a few Shapes-like texts (random models need no real vocabulary)."""
    from openbagel.tokenizer import train_tokenizer

    return train_tokenizer(TOKENIZER_TEXTS, vocab_size=min(300, cfg.llm.vocab_size),
                           extra_special_tokens=("<think>", "</think>"))


def random_pipeline(cfg: BagelConfig, directory: Path, seed: int = 0):
    """A random checkpoint of `cfg` written to `directory` (with a small trained tokenizer), loaded fp32 on CPU."""
    from openbagel.checkpoint import random_checkpoint
    from openbagel.inference.pipeline import BagelPipeline

    if not (directory / "ema.safetensors").is_file():
        random_checkpoint(directory, cfg, bench_tokenizer(cfg), seed=seed)
    pipe = BagelPipeline.from_pretrained(directory, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image(side: int, seed: int = 1234) -> Image.Image:
    """A deterministic smooth RGB picture (for edit and understanding inputs)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


# ----- measurement ---------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """The process's resident high-water mark in bytes (VmHWM)."""
    return _proc_status("VmHWM")


def rss() -> int:
    return _proc_status("VmRSS")


def anon_rss() -> int:
    """Resident memory the process holds itself, without the file pages it maps (RssAnon)."""
    return _proc_status("RssAnon")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (no polling thread: it would fight the OpenMP workers)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cpu_seconds() -> tuple[float, float]:
    """(all CPUs' busy seconds, this process's CPU seconds) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
    own = os.times()
    return busy / tick, own.user + own.system


class Contention:
    """`with Contention() as c: ...` then `c.other_cpu_s`: CPU seconds other processes used meanwhile."""

    def __enter__(self) -> "Contention":
        self.start = _cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        end = _cpu_seconds()
        self.other_cpu_s = round(max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1])), 2)


def measure(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Wall seconds of `repeat` calls after `warmup` ones: median, min, all, and the contention."""
    for _ in range(warmup):
        fn()
    times = []
    with Contention() as c:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "all_s": [round(t, 4) for t in times], "other_cpu_s": c.other_cpu_s,
            "contended": c.other_cpu_s > 0.1 * sum(times) + 0.05}


def environment(threads: int) -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": threads, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg()}


def report(rows: list[dict[str, Any]], columns: list[str], out: str | Path, meta: dict[str, Any]) -> None:
    """Print `rows` as a table (the given columns) and write {meta..., rows} as JSON to `out`."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(sys.argv)
    Path(out).write_text(json.dumps({"command": command, **meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


GiB = 1024**3


def task_jobs(pipe, side: int, steps: int, seed: int = 0) -> dict[str, list]:
    """The denoising jobs of a text-to-image (2 branches) and an edit (3 branches) at side x side."""
    settings = dict(num_inference_steps=steps)
    with pipe.engine.recording_jobs() as t2i:
        pipe.generate(PROMPT_T2I, height=side, width=side, seed=seed, **settings)
    with pipe.engine.recording_jobs() as edit:
        pipe.edit(test_image(side), PROMPT_EDIT, seed=seed, **settings)
    return {"t2i": t2i, "edit": edit}
