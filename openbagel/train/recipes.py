"""Training recipes: functions returning a `TrainConfig`, registered by name in `RECIPES`.

A variant is a few lines over a base recipe (torchtitan's config_registry habit); the command line
only overrides fields: `openbagel train tiny steps=500 optim.lr=3e-4 data.kind=shapes`.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable

from ..data.packing import PackingConfig
from ..data.sources import DataConfig
from .losses import LossWeights
from .trainer import OptimConfig, TrainConfig


def tiny() -> TrainConfig:
    """Smoke run on a laptop CPU: the random `tiny` preset learning the synthetic stream in minutes."""
    return TrainConfig(
        model="tiny",
        data=DataConfig(kind="synthetic", image_size=64),
        packing=PackingConfig(expected_num_tokens=320, max_num_tokens=384, max_num_tokens_per_sample=384,
                              rows_per_batch=4, text_cond_dropout_prob=0.1, vae_cond_dropout_prob=0.1,
                              vit_cond_dropout_prob=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="cosine", min_lr=1e-5),
        steps=200,
        timestep_shift=1.0,
        ema_decay=0.99,
        log_every=5,
        save_every=100,
    )


def tiny_shapes() -> TrainConfig:
    """`tiny` on the Shapes world (text-to-image and questions)."""
    cfg = tiny()
    cfg.data = DataConfig(kind="shapes", shapes_mix={"generate": 1.0, "question": 1.0})
    return cfg


def bagel_7b_finetune() -> TrainConfig:
    """Fine-tune the released 7B checkpoint with the official hyper-parameters (reference 6.1).

    Meant for `torchrun --nproc_per_node 8` on GPUs: FSDP2 with bf16 compute and fp32 reductions,
    activation checkpointing. Point data.paths at your parquet files.
    """
    return TrainConfig(
        init_from="ByteDance-Seed/BAGEL-7B-MoT",
        data=DataConfig(kind="t2i_parquet"),
        packing=PackingConfig(expected_num_tokens=10240, max_num_tokens=11520, max_num_tokens_per_sample=10240,
                              text_cond_dropout_prob=0.1, vae_cond_dropout_prob=0.3, vit_cond_dropout_prob=0.3),
        optim=OptimConfig(lr=2e-5, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0, schedule="constant",
                          warmup_steps=2000, grad_clip=1.0),
        loss=LossWeights(ce=1.0, mse=1.0),
        steps=10_000,
        timestep_shift=1.0,
        ema_decay=0.9999,
        activation_checkpointing=True,
        mixed_precision="bfloat16",
        seed=4396,
        log_every=10,
        save_every=2000,
    )


def shapes_tiny() -> TrainConfig:
    """The embedded model: every capability of BAGEL on the Shapes world, from scratch on a laptop CPU.

    Stages: tokenizer, autoencoder (`embedded.AUTOENCODERS`), then the unified model. Sample efficiency
    choices: latents from a Shapes-trained autoencoder (16 tokens per image), two noisy copies of each
    target per context, training timesteps shifted toward high noise where the layout is decided, thinking
    mostly on the reasoning tasks that need it.
    """
    return TrainConfig(
        model="shapes-tiny",
        vae_from="{out}/autoencoder",
        data=DataConfig(
            kind="shapes",
            shapes_mix={"generate": 0.26, "edit": 0.26, "question": 0.20, "reason_edit": 0.10,
                        "reason_question": 0.08, "chat": 0.10},
            think_prob={"reason_edit": 0.7, "reason_question": 0.7, "default": 0.1},
            target_copies=2,
        ),
        packing=PackingConfig(expected_num_tokens=448, max_num_tokens=512, max_num_tokens_per_sample=512,
                              rows_per_batch=4, text_cond_dropout_prob=0.1, vae_cond_dropout_prob=0.1,
                              vit_cond_dropout_prob=0.1),
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, schedule="cosine",
                          warmup_steps=200, min_lr=5e-5, grad_clip=1.0),
        steps=6000,
        timestep_shift=2.0,
        ema_decay=0.999,
        seed=0,
        log_every=10,
        save_every=200,
        eval_every=500,
    )


def shapes_tiny_gpu() -> TrainConfig:
    """Continue the shipped embedded model on one GPU for a fixed time (`time_limit_s=400`).

    Batches of 128 rows (~62,000 tokens; an H100 takes ~0.28 s a step in fp32 with TF32 matmuls, where
    32 rows took 0.12 s: the small model is launch-bound, so larger batches come almost free) packed by
    14 worker processes; the ViT position table centred and scaled (`Bagel.centre_position_tables`: on
    the small grid the sin-cos table barely tells cells apart, so answers read an average of the image).
    The latent table stays: centring it under trained weights sends the velocity MSE from 0.1 to 2.1, a
    restart of the generation side (the option is deterministic, so a second sitting does not scale twice).
    A constant LR with the EMA doing the averaging, since the number of steps a time budget buys is not
    known ahead.
    """
    from ..inference.pipeline import EMBEDDED_MODEL

    cfg = shapes_tiny()
    cfg.init_from, cfg.vae_from = str(EMBEDDED_MODEL), None
    cfg.position_table_scale, cfg.position_tables = 40.0, ("vit",)
    cfg.data.shapes_mix = {"generate": 0.22, "edit": 0.26, "question": 0.26, "reason_edit": 0.10,
                           "reason_question": 0.06, "chat": 0.10}
    cfg.packing = dataclasses.replace(cfg.packing, rows_per_batch=128)
    cfg.optim = dataclasses.replace(cfg.optim, lr=6e-4, schedule="constant", warmup_steps=100)
    cfg.steps, cfg.time_limit_s, cfg.data_workers = 1_000_000, 400.0, 14
    cfg.save_every, cfg.eval_every, cfg.log_every = 2000, 0, 20
    return cfg


def shapes_tiny_gpu_cooldown() -> TrainConfig:
    """The last sitting before shipping: `shapes-tiny-gpu` with its LR annealed to ~0 (`init_from=RUN/export`).

    The constant-LR sittings leave the averaging to the EMA; a short cosine decay after them (505 steps in
    165 s on an H100) took the flow MSE off its 0.063-0.066 plateau to 0.046 and moved questions and thoughts
    about as much as the 1,620 constant-LR steps before it (MODEL_CARD.md, session 14). The faster EMA keeps
    the export close to the annealed weights rather than averaging them with the higher-LR ones.
    """
    cfg = shapes_tiny_gpu()
    cfg.optim = dataclasses.replace(cfg.optim, schedule="cosine", warmup_steps=40, min_lr=2e-5)
    cfg.steps, cfg.time_limit_s, cfg.ema_decay = 560, 165.0, 0.995
    return cfg


def shapes_tiny_gpu_scratch() -> TrainConfig:
    """The next retrain of the embedded model, from scratch on one GPU for a fixed time (`time_limit_s=540`).

    What the CPU run and the GPU sittings taught: a real BPE tokenizer (the shipped run's spelled words in
    characters), the centred ViT position table from step 0, 30% questions, and the shipped autoencoder
    (`vae_from` reads it from the embedded model's folder). The latent table stays the plain sin-cos one:
    centred x40 from scratch it slowed the flow loss (MSE 1.78 vs 1.19 at step 150 on this CPU, 4-row
    steps; CE 1.26 vs 1.27), and nothing longer has been measured.
    """
    from ..inference.pipeline import EMBEDDED_MODEL

    cfg = shapes_tiny_gpu()
    cfg.init_from, cfg.model, cfg.tokenizer, cfg.vae_from = None, "shapes-tiny", None, str(EMBEDDED_MODEL)
    cfg.data.shapes_mix = {"generate": 0.22, "edit": 0.22, "question": 0.30, "reason_edit": 0.08,
                           "reason_question": 0.08, "chat": 0.10}
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-3, warmup_steps=200)
    cfg.timestep_shift, cfg.time_limit_s = 3.0, 540.0
    return cfg


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "shapes-tiny": shapes_tiny,
    "shapes-tiny-gpu": shapes_tiny_gpu,
    "shapes-tiny-gpu-cooldown": shapes_tiny_gpu_cooldown,
    "shapes-tiny-gpu-scratch": shapes_tiny_gpu_scratch,
    "tiny": tiny,
    "tiny-shapes": tiny_shapes,
    "bagel-7b-finetune": bagel_7b_finetune,
}


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`a.b=value` assignments; values are Python literals (3e-4, True, None, ['x.parquet']) or bare strings.
    Each touched section is validated again once all assignments are made."""
    touched = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        *parents, name = key.strip().split(".")
        target = cfg
        for part in parents:
            target = getattr(target, part, None)
            if not dataclasses.is_dataclass(target):
                raise ValueError(f"override {key!r}: {part!r} is not a config section")
        if name not in {f.name for f in dataclasses.fields(target)}:
            raise ValueError(f"override {key!r}: no field {name!r} in {type(target).__name__}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = getattr(target, name)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and not isinstance(value, type(old)):
            raise ValueError(f"override {key!r}: expected {type(old).__name__}, got {value!r}")
        setattr(target, name, value)
        touched.append(target)
    for section in {id(t): t for t in touched}.values():
        if hasattr(section, "__post_init__"):
            section.__post_init__()
    return cfg
