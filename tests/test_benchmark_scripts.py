"""The GPU benchmark scripts run end to end (on CPU, at the unit-test size), so they work when a GPU comes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from openbagel.train.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_at_small_size(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_7b.py"), "--config", "tiny", "--device", "cpu",
           "--dtype", "fp32", "--side", "64", "--steps", "3", "--repeat", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["peak_source"] == "measured fp32 matmul"
    assert [r["task"] for r in report["rows"]] == ["t2i", "edit"]
    for row in report["rows"]:
        assert row["seconds"] > 0 and row["flop"] > 0 and row["peak_memory_gib"] > 0
        assert 0 < row["mfu"] < 1.5


def test_gpu_profile_runs_on_cpu_at_small_size():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "--config", "tiny", "--device", "cpu",
           "--dtype", "fp32", "--side", "64", "--steps", "2", "--rows", "5"]
    table = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    assert "Self CPU" in table and "aten::" in table


def test_data_workers_benchmark_runs(tmp_path):
    out = tmp_path / "workers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_workers.py"), "--batches", "1", "--workers", "1",
           "--head-start", "0", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["rows_per_batch"] == get_recipe("shapes-tiny-gpu").packing.rows_per_batch
    assert report["vae_images_per_batch"] > 0
    assert [r["what"].split(",")[0] for r in report["rows"]] == ["pack one batch (one process)", "receive", "receive"]
    assert all(r["seconds"] > 0 for r in report["rows"])


def test_cpu_7b_benchmark_writes_a_streamed_checkpoint_and_loads_it_quantised(tmp_path):
    """The full-size run's path at the unit-test size: the hand-written safetensors file loads strictly."""
    import torch
    from safetensors import safe_open

    out, work = tmp_path / "cpu.json", tmp_path / "ck"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu_7b.py"), "--config", "tiny", "--work", str(work),
           "--side", "64", "--tokens", "3", "--threads", "1", "--quantize", "int4", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["quantize"] == "int4" and row["memory_limit_gib"] is None
    assert row["load_s"] > 0 and row["peak_gib"] >= row["load_peak_gib"] > 0 and row["denoise_steps"] == 2
    assert 1 <= row["answer_tokens"] <= 3 and row["t2i_s"] > row["per_step_s"] > 0
    with safe_open(str(work / "ema.safetensors"), "pt") as f:
        keys = list(f.keys())
        norm = next(k for k in keys if k.endswith("input_layernorm.weight"))
        bias = next(k for k in keys if k.endswith("q_proj.bias"))
        weight = next(k for k in keys if k.endswith("q_proj.weight"))
        assert f.get_tensor(norm).eq(1).all() and f.get_tensor(bias).eq(0).all()
        w = f.get_tensor(weight)
        assert w.dtype == torch.bfloat16 and 0.015 < w.float().std() < 0.025 and not w[0].equal(w[1])
