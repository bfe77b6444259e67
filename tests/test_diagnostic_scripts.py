"""The model-diagnosis scripts of `scripts/` run on the embedded model and measure what they claim."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from openbagel.models import qwen2_mot

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recorded_attention_weights_reproduce_the_attention_output():
    probe = _load("attention_probe")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 8, generator=g) for h in (4, 2, 2))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    store: list[torch.Tensor] = []
    original = qwen2_mot.attention
    with probe.recorded_attention(store):
        out = qwen2_mot.attention(q, k, v, mask)
    assert qwen2_mot.attention is original  # restored on exit
    (weights,) = store
    assert weights.shape == (1, 4, 5, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 4, 5))
    assert torch.allclose(weights @ v.repeat_interleave(2, dim=1), out, atol=1e-5)


def test_attention_probe_runs_on_the_embedded_model():
    cmd = [sys.executable, str(ROOT / "scripts" / "attention_probe.py"), str(ROOT / "openbagel/weights/shapes-tiny"), "-n", "3"]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout.splitlines()
    assert lines[0].startswith("3 colour questions, first answer token right: own image")
    table = [[float(x) for x in line.split()] for line in lines[2:]]
    assert [int(row[0]) for row in table] == list(range(6))  # one row per LLM layer
    for row in table:
        mass, selectivity = row[1:5], row[5:9]
        assert all(0 <= m <= 1 for m in mass) and all(s >= 0 for s in selectivity)


def test_cell_probe_runs_on_the_embedded_model_and_finds_each_object_in_its_cell():
    cmd = [sys.executable, str(ROOT / "scripts" / "cell_probe.py"), str(ROOT / "openbagel/weights/shapes-tiny")]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout.splitlines()
    cells = lines[1:10]
    assert len(cells) == 9 and all(line.endswith("(yes)") for line in cells)  # the ViT patch layout is right
    assert lines[10].startswith("answers right ") and "distinct answers" in lines[10]
    table = [[float(x) for x in line.split()] for line in lines[12:]]
    assert [int(row[0]) for row in table] == list(range(6))
    for row in table:
        spread, on_object = row[1:5], row[5:9]
        assert all(s >= 0 for s in spread) and all(0 <= w <= 1 for w in on_object)


def test_model_card_examples_render_the_strip_and_print_the_answers(tmp_path):
    out = tmp_path / "strip.png"
    cmd = [sys.executable, str(ROOT / "scripts" / "model_card_examples.py"), "--out", str(out)]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout.splitlines()
    from PIL import Image

    assert Image.open(out).size == (6 * 128 + 5 * 8, 128)  # source, text-to-image, four edits
    assert lines[0].startswith("caption: a large red circle")
    answers = [line for line in lines if " -> " in line]
    assert len(answers) == 3 and all("(expected " in line for line in answers)
