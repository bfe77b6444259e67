"""`openbagel train RECIPE [key=value ...] [--resume] [--out DIR]`: argparse -> recipe -> Trainer."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the module stays light: `openbagel --help` builds its parser
    from .trainer import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (see openbagel.train.recipes.RECIPES)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. steps=500 optim.lr=3e-4")
    parser.add_argument("--out", default=None, help="run folder (default runs/RECIPE)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")


def run(args: argparse.Namespace) -> int:
    from .embedded import ensure_autoencoder, periodic_eval
    from .recipes import apply_overrides, get_recipe
    from .trainer import Trainer

    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    out = Path(args.out or f"runs/{args.recipe}")
    check_run_folder(cfg, out, resume=args.resume)
    if cfg.vae_from and "{out}" in cfg.vae_from:
        cfg.vae_from = cfg.vae_from.format(out=out)
        ensure_autoencoder(args.recipe, Path(cfg.vae_from))
    trainer = Trainer(cfg, out, resume=args.resume)
    history = trainer.train(on_step=periodic_eval(cfg.eval_every) if cfg.eval_every else None)
    if trainer.world.is_main and history:
        first, last = history[0], history[-1]
        print(f"step {last.step}: loss {first.loss:.4f} -> {last.loss:.4f} (ce {last.ce:.4f}, mse {last.mse:.4f}); "
              f"run folder {trainer.out}")
    return 0


def check_run_folder(cfg: TrainConfig, out: Path, *, resume: bool) -> None:
    """Before any work: a new run needs a fresh folder, `--resume` a checkpoint. The run's settings are
    kept in `out/train_config.json`; a resume that changes them says which (a longer cosine or a new
    learning rate are normal reasons), so nothing changes silently."""
    from .checkpointing import latest_checkpoint

    saved = out / "train_config.json"
    has_checkpoint = latest_checkpoint(out / "checkpoints") is not None
    if resume and not has_checkpoint:
        raise ValueError(f"--resume: no complete checkpoint under {out / 'checkpoints'}; start without --resume")
    if not resume and has_checkpoint:
        raise ValueError(f"{out} already holds a run; continue it with --resume, or give another --out")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports and writes
        return
    stale = out / "metrics.jsonl"
    if not resume and stale.exists():  # a run that stopped before its first checkpoint: nothing to resume
        print(f"{out}: the earlier run left no checkpoint; starting over (its metrics.jsonl is replaced)",
              file=sys.stderr)
        stale.unlink()
    now = _flat(dataclasses.asdict(cfg))
    if resume and saved.is_file():
        before = json.loads(saved.read_text())  # written flat by an earlier start of this run
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
        if changed:
            print(f"resuming {out} with changed settings: {'; '.join(changed)}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(now, indent=1) + "\n")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}, tuples as lists (as JSON keeps them)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("shapes_mix", "think_prob"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


def register(subparsers) -> None:
    """Add the `train` command to the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "train", help="train or fine-tune (single process, or under torchrun)",
        description="Train or fine-tune with a recipe of openbagel/train/recipes.py; key=value overrides any "
                    "field of its TrainConfig. An unknown recipe name lists the recipes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  openbagel train tiny steps=50 --out runs/smoke           # seconds on a laptop CPU\n"
               "  openbagel train shapes-tiny --out runs/shapes-tiny       # the embedded model from scratch\n"
               "  torchrun --nproc_per_node 8 -m openbagel.train bagel-7b-finetune \"data.paths=['t2i.parquet']\"")
    add_arguments(parser)
    parser.set_defaults(func=run)

