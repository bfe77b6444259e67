"""The embedded model's recipe around the trainer: autoencoder stage first, Shapes scores while training.

`openbagel train shapes-tiny` runs three stages in one run folder: the tokenizer (trained by the
trainer on the Shapes texts), the autoencoder (`autoencoder.py`, skipped when its folder is complete)
and the unified model. Every `eval_every` steps the EMA weights are exported and scored on a small
fresh Shapes test set with the detector, because the loss alone says little about exact scenes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import PRESETS
from .autoencoder import AutoencoderRecipe, polish_decoder, train_autoencoder

AUTOENCODERS: dict[str, AutoencoderRecipe] = {
    "shapes-tiny": AutoencoderRecipe(vae=PRESETS["shapes-tiny"].vae, steps=3500, batch_size=16, lr=2e-3,
                                     grad_clip=1e9, foreground_weight=8.0, save_every=500,
                                     polish_steps=1500, polish_lr=3e-4, outline_weight=16.0),
}
QUICK_EVAL_KINDS = {"generate": (False,), "edit": (False,), "question": (False,), "reason_edit": (True,)}


def ensure_autoencoder(recipe_name: str, folder: Path, log=print) -> None:
    """Train the recipe's autoencoder into `folder` unless it is already there."""
    recipe = AUTOENCODERS.get(recipe_name)
    if (folder / "ae.safetensors").is_file() and (folder / "ae_config.json").is_file():
        metrics = folder / "ae_metrics.json"
        if recipe and recipe.polish_steps and metrics.is_file() and "polished_steps" not in json.loads(metrics.read_text()):
            log(f"stage 1b: polishing the decoder of {folder}")
            polish_decoder(recipe, folder, log=log)
        return
    if recipe is None:
        raise FileNotFoundError(f"{folder} holds no autoencoder and recipe {recipe_name!r} has no autoencoder stage")
    log(f"stage 1: training the autoencoder into {folder}")
    train_autoencoder(recipe, folder, log=log)


def periodic_eval(every: int, n: int = 3):
    """An `on_step` hook: export the EMA, score it on fresh Shapes tasks, append to OUT/shapes_eval.jsonl."""
    from ..inference.pipeline import BagelPipeline
    from ..shapes.evaluate import evaluate, pipeline_runner

    def hook(trainer, stats) -> None:
        if not trainer.world.is_main or stats.step % every:
            return
        start = time.time()
        folder = trainer.export(trainer.out / "eval_export")
        pipe = BagelPipeline.from_pretrained(folder, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        report = evaluate(pipeline_runner(pipe), n=n, seed=stats.step, think_modes=QUICK_EVAL_KINDS)
        summary = {"step": stats.step, "eval_seconds": round(time.time() - start, 1), "metrics": report["metrics"]}
        with open(trainer.out / "shapes_eval.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")

    return hook
