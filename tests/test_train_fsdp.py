"""Two CPU processes under torchrun (FSDP2, gloo) match one process on the same global batch."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from openbagel.checkpoint import load_checkpoint
from openbagel.config import preset
from openbagel.data.sources import synthetic_source
from openbagel.models.bagel import Bagel
from openbagel.tokenizer import train_tokenizer
from openbagel.train.checkpointing import latest_checkpoint
from openbagel.train.recipes import apply_overrides, tiny
from openbagel.train.trainer import Trainer

# One sample per row and per micro-batch: one process with 2 micro-batches sees exactly what 2 ranks
# with 1 micro-batch each see (rank r reads samples r, r+2, ...; seeds follow the global micro-batch).
COMMON = ["steps=2", "progress=False", "export_ema=False", "log_every=1", "save_every=2", "data.image_size=32",
          "packing.expected_num_tokens=1", "packing.max_num_tokens=128", "packing.max_num_tokens_per_sample=128",
          "packing.rows_per_batch=1", "optim.warmup_steps=1", "optim.lr=0.01"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = Bagel(preset("tiny")).state_dict()
    dcp.load({"model": state}, checkpoint_id=str(latest_checkpoint(run / "checkpoints") / "state"))
    return state


def losses(run: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["ce"], r["mse"]) for r in records]


@pytest.mark.timeout(240)
def test_two_process_fsdp_matches_single_process(tmp_path):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun not installed next to the interpreter")
    texts = [x.text for _, s in itertools.islice(synthetic_source(0)(0, 1), 200) for x in s if hasattr(x, "text")]
    train_tokenizer(texts, 512, preset("tiny").extra_special_tokens).save(tmp_path / "tok")
    common = COMMON + [f"tokenizer={tmp_path / 'tok'}"]

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "openbagel.train", "tiny",
                           *common, "grad_accum=1", "export_ema=True", "--out", str(tmp_path / "fsdp")],
                          env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]

    Trainer(apply_overrides(tiny(), common + ["grad_accum=2"]), tmp_path / "single").train()

    for (ce_a, mse_a), (ce_b, mse_b) in zip(losses(tmp_path / "single"), losses(tmp_path / "fsdp"), strict=True):
        assert ce_a == pytest.approx(ce_b, rel=1e-5) and mse_a == pytest.approx(mse_b, rel=1e-5)
    single, fsdp = final_weights(tmp_path / "single"), final_weights(tmp_path / "fsdp")
    for name in single:
        torch.testing.assert_close(fsdp[name], single[name], rtol=1e-5, atol=1e-5, msg=name)
    assert single["llm2vae.weight"].abs().sum() > 0, "the zero-initialised velocity head must have been trained"
    exported = load_checkpoint(tmp_path / "fsdp" / "export").model.state_dict()  # EMA gathered from shards
    assert exported.keys() == single.keys()
