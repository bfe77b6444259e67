"""`openbagel train RECIPE [key=value ...] [--resume] [--out DIR]`: argparse -> recipe -> Trainer."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (see openbagel.train.recipes.RECIPES)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. steps=500 optim.lr=3e-4")
    parser.add_argument("--out", default=None, help="run folder (default runs/RECIPE)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpointing import latest_checkpoint
    from .embedded import ensure_autoencoder, periodic_eval
    from .recipes import apply_overrides, get_recipe, check_run_folder
    from .trainer import Trainer

    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    out = Path(args.out or f"runs/{args.recipe}")
    check_run_folder(cfg, out, resume=args.resume, has_checkpoint=latest_checkpoint(out / "checkpoints") is not None)
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

