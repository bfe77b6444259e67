"""Resumable training checkpoints, written atomically, and the EMA export in the official layout.

A checkpoint is a folder `step_0000100/` under the run's `checkpoints/`:
- `state/`: model, EMA and optimiser tensors through `torch.distributed.checkpoint` (each rank writes
  its own shards);
- `trainer_rank{r}.pt`: step, scheduler, RNG states and the data position of rank r. The data stream is
  dealt out by rank, so a run resumes on the number of processes that wrote it (checked, with a message).
Every rank writes into `.tmp_step_0000100/`; only when all are done does rank 0 rename it (an atomic
`os.replace`). A crash mid-write leaves a temp folder that is ignored and removed by the next save, so
the last complete checkpoint always loads. Older checkpoints beyond `keep` are deleted.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..checkpoint import save_checkpoint
from ..config import BagelConfig
from ..models.bagel import Bagel
from ..models.vae import AutoEncoder
from ..tokenizer import BagelTokenizer
from .ema import EMA
from .parallel import World, barrier

_NAME = re.compile(r"^step_(\d{7})$")
TMP_PREFIX = ".tmp_"


@dataclass
class TrainState:
    """Everything a checkpoint restores, besides the tensors of model, EMA and optimiser."""

    step: int
    scheduler: dict
    data: dict  # this rank's Packer.state()


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns when used without a process group; a world of one is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(root: Path, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             ema: EMA, state: TrainState, keep: int) -> Path:
    """Write `root/step_XXXXXXX` atomically (collective: every rank calls it)."""
    final = root / f"step_{state.step:07d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale)
        tmp.mkdir()
    barrier()
    tensors = _state_tensors(model, optimizer, ema)
    with _single_process_ok():
        dcp.save(tensors, checkpoint_id=str(tmp / "state"))
    torch.save({"step": state.step, "scheduler": state.scheduler, "data": state.data, "rng": _rng_state()},
               tmp / f"trainer_rank{world.rank}.pt")
    barrier()
    if world.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def _state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> dict:
    """The (possibly sharded) tensors a training checkpoint saves and restores in place."""
    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
        "ema": ema.state_dict(),
    }


def load_training_checkpoint(path: Path, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             ema: EMA) -> TrainState:
    """Restore tensors in place (resharding as needed), RNG states, and return step/scheduler/data."""
    writers = len(list(path.glob("trainer_rank*.pt")))
    if writers != world.size:
        raise ValueError(f"{path} was written by {writers} process(es) and this run has {world.size}: resume it "
                         f"with the same number (torchrun --nproc_per_node {writers}), since each process "
                         "continues its own part of the data stream")
    tensors = _state_tensors(model, optimizer, ema)
    with _single_process_ok():
        dcp.load(tensors, checkpoint_id=str(path / "state"))
    set_model_state_dict(model, tensors["model"])
    set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    ema.load_state_dict(tensors["ema"])
    extra_file = path / f"trainer_rank{world.rank}.pt"
    extra = torch.load(extra_file, weights_only=True)  # plain types only: a tampered file cannot run code
    _set_rng_state(extra["rng"])
    return TrainState(step=extra["step"], scheduler=extra["scheduler"], data=extra["data"])


def full_state(model: torch.nn.Module, ema: EMA | None = None) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU (collective under FSDP; complete on rank 0), EMA weights if given."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ema is not None:
        for name, t in ema.state_dict().items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            state[name] = full.detach().cpu()
    return state


def export_ema(directory: Path, world: World, config: BagelConfig, model: torch.nn.Module, ema: EMA,
               vae: AutoEncoder, tokenizer: BagelTokenizer, dtype: torch.dtype | None = None) -> Path:
    """Write the EMA weights (frozen weights as they are) as an official checkpoint (collective)."""
    state = full_state(model, ema)
    if world.is_main:
        with torch.device("meta"):
            export = Bagel(config)
        export.load_state_dict(state, strict=True, assign=True)
        save_checkpoint(directory, config, export, vae, tokenizer, dtype=dtype)
    barrier()
    return directory
