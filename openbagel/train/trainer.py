"""The trainer: builds model, data and optimiser from a `TrainConfig`, owns the step, saves and resumes.

One code path for one CPU process and for `torchrun --nproc_per_node N` (FSDP2, see `parallel.py`).
A step gathers `grad_accum` packed micro-batches, normalises both losses per token over the global
batch (`losses.py`), clips, steps AdamW and the schedule, then updates the EMA. Randomness of a
micro-batch (VAE posterior sample, flow noise) is seeded by its global index
`(step * grad_accum + micro) * world + rank`, so a resumed run computes the same numbers. (Each rank
packs its own share of the sample stream, so a run on another number of processes sees other batches.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..config import BagelConfig, VAEConfig, preset
from ..data.interleaved import TextItem
from ..data.packing import Packer, PackingConfig
from ..data.sources import DataConfig, build_source
from ..data.workers import WorkerPacker
from ..models.bagel import Bagel
from ..models.vae import AutoEncoder
from ..tokenizer import BagelTokenizer, train_tokenizer
from . import checkpointing
from .ema import EMA
from .losses import LossWeights, global_token_counts, objective, reported_losses
from .metrics import MetricsLog, plot_losses
from .parallel import World, all_reduce_sum, barrier, init_distributed, parallelize, set_gradient_sync

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_SAMPLES = 500  # a run without `tokenizer=` trains its BPE on the texts of this many samples


@dataclass
class OptimConfig:
    """AdamW and the LR schedule; defaults are the official fine-tuning values (reference 6.1)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (both after a linear warm-up)
    warmup_steps: int = 2000
    min_lr: float = 1e-7  # cosine floor
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not (self.lr > 0 and self.min_lr >= 0 and self.warmup_steps >= 0 and self.grad_clip > 0
                and self.weight_decay >= 0 and self.eps > 0):
            raise ValueError("optim: lr, eps and grad_clip must be > 0; min_lr, warmup_steps and weight_decay >= 0 "
                             f"(got lr={self.lr}, eps={self.eps}, grad_clip={self.grad_clip}, min_lr={self.min_lr}, "
                             f"warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay})")


@dataclass
class TrainConfig:
    """One training run. Recipes (`recipes.py`) are functions returning one of these."""

    model: str = "tiny"  # config preset for a random init (ignored with init_from)
    init_from: str | None = None  # checkpoint folder or hub id to fine-tune
    reinit: tuple[str, ...] = ()  # parameter-name prefixes of init_from given a fresh init, e.g. ("vit_model.",)
    position_table_scale: float = 0.0  # > 0: centred sin-cos position tables times this (Bagel.centre_position_tables)
    position_tables: tuple[str, ...] = ("vit", "latent")  # which tables position_table_scale applies to
    tokenizer: str | None = None  # tokenizer folder for a random init; None: train a BPE on the data
    vae_from: str | None = None  # folder with ae.safetensors + ae_config.json (a trained autoencoder)
    data: DataConfig = field(default_factory=DataConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    steps: int = 1000
    time_limit_s: float = 0.0  # > 0: stop (save, export) once the loop has run this long, e.g. on a lent GPU
    grad_accum: int = 1
    timestep_shift: float = 1.0
    ema_decay: float = 0.9999
    freeze_llm: bool = False
    freeze_vit: bool = False
    freeze_vae: bool = True  # the VAE is never trained: latents are encoded without grad, as officially
    freeze_und: bool = False  # train only the generation expert and gen-side modules
    activation_checkpointing: bool = False
    compile_layers: bool = False  # torch.compile each decoder / ViT layer (the first steps compile; pays where launch-bound)
    mixed_precision: str | None = None  # "bfloat16": FSDP2 MixedPrecisionPolicy, or autocast in one process
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions on TF32 tensor cores (Ampere and later)
    vae_sample: bool = True  # sample the VAE posterior (official) rather than take its mean
    seed: int = 4396
    device: str = "auto"
    data_workers: int = 0  # > 0: pack batches in this many background processes (data/workers.py)
    log_every: int = 10
    eval_every: int = 0  # Shapes runs: score the EMA with the detector this often (0 = never)
    save_every: int = 2000
    keep_checkpoints: int = 2
    export_ema: bool = True  # write the EMA in the official layout to OUT/export at the end
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.freeze_vae:
            raise ValueError("freeze_vae=False is not supported: latents are encoded without gradients")
        if self.grad_accum < 1 or self.steps < 0:
            raise ValueError("grad_accum must be >= 1 and steps >= 0")
        if self.mixed_precision not in (None, "bfloat16", "float16"):
            raise ValueError(f"mixed_precision must be None, 'bfloat16' or 'float16', got {self.mixed_precision!r}")
        if self.reinit and not self.init_from:
            raise ValueError("reinit re-initialises parts of init_from: set init_from too (a random init is all new)")
        if self.data_workers < 0 or self.time_limit_s < 0:
            raise ValueError("data_workers and time_limit_s must be >= 0")
        for name in ("log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: never), got {self.eval_every}")
        if self.position_table_scale < 0:
            raise ValueError(f"position_table_scale must be > 0 (or 0: the official sin-cos tables), got {self.position_table_scale}")


@dataclass
class StepStats:
    step: int
    loss: float
    ce: float
    mse: float
    grad_norm: float
    lr: float
    tokens: int  # real (non-pad) tokens of the global batch
    seconds: float
    data_seconds: float  # of `seconds`, waiting for the packed batches (the rest is the device's step)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the base LR at a step: linear warm-up, then constant or cosine down to min_lr."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def apply_freezing(model: Bagel, cfg: TrainConfig) -> None:
    """requires_grad=False on frozen parts. `freeze_und` keeps only the generation path trainable
    (the official code detaches the und path instead; with no und parameter trainable the updates agree,
    except that CE can still reach gen-expert K/V of clean VAE context, so set loss.ce=0 with it)."""
    if cfg.freeze_llm:
        model.language_model.requires_grad_(False)
    if cfg.freeze_vit:
        model.vit_model.requires_grad_(False)
    if cfg.freeze_und:
        gen_side = ("vae2llm.", "llm2vae.", "time_embedder.")
        for name, p in model.named_parameters():
            if not ("_moe_gen" in name or name.startswith(gen_side)):
                p.requires_grad_(False)
    for table in (model.vit_pos_embed, model.latent_pos_embed):  # fixed sin-cos tables
        table.requires_grad_(False)


def load_vae_config(folder: str | Path) -> VAEConfig:
    return VAEConfig(**json.loads((Path(folder) / "ae_config.json").read_text()))


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.world: World = init_distributed(cfg.device)
        dev = self.world.device
        if dev.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + self.world.rank)
        source = build_source(cfg.data, cfg.seed)

        # 1. Model, VAE, tokenizer: a checkpoint, or a random init of a preset.
        if cfg.init_from:
            loaded = load_checkpoint(cfg.init_from, device="cpu")
            self.model_cfg, model, vae, self.tokenizer = loaded.config, loaded.model, loaded.vae, loaded.tokenizer
            if cfg.reinit:
                with torch.random.fork_rng():
                    torch.manual_seed(cfg.seed)
                    model.init_weights(only=cfg.reinit)
        else:
            self.model_cfg = preset(cfg.model)
            self.tokenizer = self._tokenizer(source)
            if cfg.vae_from:
                self.model_cfg = dataclasses.replace(self.model_cfg, vae=load_vae_config(cfg.vae_from))
            with torch.random.fork_rng():  # the same init on every rank; the VAE keeps torch's default init
                torch.manual_seed(cfg.seed)
                model, vae = Bagel(self.model_cfg), AutoEncoder(self.model_cfg.vae)
                model.init_weights()
            if cfg.vae_from:
                vae.load_state_dict(load_file(str(Path(cfg.vae_from) / "ae.safetensors")))
        if cfg.position_table_scale:
            model.centre_position_tables(cfg.position_table_scale, tuple(cfg.position_tables))
        self.model, self.vae = model.to(dev).train(), vae.to(dev).eval().requires_grad_(False)
        apply_freezing(self.model, cfg)

        # 2. Parallelism from outside; then EMA shadows and the optimiser see the (sharded) parameters.
        mp = DTYPES[cfg.mixed_precision] if cfg.mixed_precision else None
        parallelize(self.model, self.world, activation_checkpointing=cfg.activation_checkpointing,
                    compile_layers=cfg.compile_layers, param_dtype=mp)
        self.compute_dtype = mp if (mp and self.world.distributed) else torch.float32
        self.autocast = (torch.autocast(dev.type, dtype=mp) if (mp and not self.world.distributed)
                         else contextlib.nullcontext())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("every parameter is frozen: nothing to train")
        self.ema = EMA(self.model, cfg.ema_decay)
        o = cfg.optim
        # One fused kernel per step on a single GPU, where the step is launch-bound; foreach elsewhere.
        fused = dev.type == "cuda" and not self.world.distributed
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, foreach=not fused, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, cfg.steps))
        if cfg.data_workers:
            self.packer = WorkerPacker(cfg.data, self.tokenizer, self.model_cfg, cfg.packing, cfg.seed,
                                       self.world.rank, self.world.size, workers=cfg.data_workers)
        else:
            self.packer = Packer(source, self.tokenizer, self.model_cfg, cfg.packing, cfg.seed,
                                 self.world.rank, self.world.size)
        self.step = 0
        self.ckpt_root = self.out / "checkpoints"
        if resume:
            self._resume()

    def _tokenizer(self, source) -> BagelTokenizer:
        """The run's tokenizer: given, saved by an earlier start of this run, or trained on the data."""
        if self.cfg.tokenizer:
            return BagelTokenizer.from_dir(self.cfg.tokenizer)
        folder = self.out / "tokenizer"
        if self.world.is_main and not (folder / "tokenizer.json").is_file():
            texts = [item.text for _, sample in itertools.islice(source(0, 1), TOKENIZER_SAMPLES) for item in sample
                     if isinstance(item, TextItem)]
            if not texts:
                raise ValueError(f"the first {TOKENIZER_SAMPLES} samples of the data hold no text to train a "
                                 "tokenizer on: set `tokenizer=` to a tokenizer folder")
            train_tokenizer(texts, self.model_cfg.llm.vocab_size, self.model_cfg.extra_special_tokens).save(folder)
        barrier()
        return BagelTokenizer.from_dir(folder)

    def _resume(self) -> None:
        path = checkpointing.latest_checkpoint(self.ckpt_root)
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.ckpt_root}")
        state = checkpointing.load_training_checkpoint(path, self.world, self.model, self.optimizer, self.ema)
        self.step = state.step
        self.scheduler.load_state_dict(state.scheduler)
        # The checkpoint's base LR would win over a changed `optim.lr`: the resumed run uses this config's.
        self.scheduler.base_lrs = [self.cfg.optim.lr] * len(self.optimizer.param_groups)
        lrs = [self.cfg.optim.lr * f(self.scheduler.last_epoch) for f in self.scheduler.lr_lambdas]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        self.packer.load_state(state.data)

    def save(self) -> Path:
        state = checkpointing.TrainState(self.step, self.scheduler.state_dict(), self.packer.state())
        return checkpointing.save_training_checkpoint(self.ckpt_root, self.world, self.model, self.optimizer,
                                                      self.ema, state, self.cfg.keep_checkpoints)

    def export(self, directory: str | Path | None = None) -> Path:
        directory = Path(directory) if directory else self.out / "export"
        return checkpointing.export_ema(directory, self.world, self.model_cfg, self.model, self.ema, self.vae,
                                        self.tokenizer)

    # ----- the step ------------------------------------------------------------------------------

    def _generator(self, micro: int) -> torch.Generator:
        index = (self.step * self.cfg.grad_accum + micro) * self.world.size + self.world.rank
        return torch.Generator(self.world.device).manual_seed(self.cfg.seed * 1_000_003 + index)

    def train_step(self) -> StepStats:
        cfg, dev = self.cfg, self.world.device
        start = time.perf_counter()
        batches = [self.packer.next_batch() for _ in range(cfg.grad_accum)]
        data_seconds = time.perf_counter() - start
        counts = global_token_counts(batches, dev)
        sums = torch.zeros(2, device=dev)
        tokens = torch.tensor(float(sum(b.num_tokens for b in batches)), device=dev)
        for micro, batch in enumerate(batches):
            batch = batch.to(dev)
            gen = self._generator(micro)
            if batch.vae_images:
                batch.latents = self.model.encode_latents(self.vae, batch.vae_images, sample=cfg.vae_sample,
                                                          generator=gen).to(self.compute_dtype)
            set_gradient_sync(self.model, micro == cfg.grad_accum - 1)
            with self.autocast:
                terms = self.model.forward_train(batch, noise_generator=gen, timestep_shift=cfg.timestep_shift)
                loss = objective(terms, counts, cfg.loss, self.world.size)
            loss.backward()
            sums += torch.stack([terms.ce_sum.detach(), terms.mse_sum.detach()]).float()
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        ce, mse = reported_losses(sums, counts)
        total = cfg.loss.ce * ce + cfg.loss.mse * mse
        return StepStats(self.step, total, ce, mse, float(norm), lr, int(all_reduce_sum(tokens)),
                         time.perf_counter() - start, data_seconds)

    # ----- the loop ------------------------------------------------------------------------------

    def train(self, on_step=None) -> list[StepStats]:
        """Run to cfg.steps, or until cfg.time_limit_s has passed (then save and export as at the end).
        `on_step(trainer, stats)` is called after each step (e.g. a periodic eval)."""
        cfg, main = self.cfg, self.world.is_main
        log = MetricsLog(self.out) if main else None
        history: list[StepStats] = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (main and cfg.progress), dynamic_ncols=True)
        deadline = time.monotonic() + cfg.time_limit_s if cfg.time_limit_s else math.inf
        out_of_time = False
        try:
            while self.step < cfg.steps and not out_of_time:
                s = self.train_step()
                out_of_time = bool(cfg.time_limit_s) and self._agreed(time.monotonic() >= deadline)
                history.append(s)
                tps = s.tokens / s.seconds
                bar.update(1)
                bar.set_postfix(loss=f"{s.loss:.4f}", ce=f"{s.ce:.3f}", mse=f"{s.mse:.3f}", tok_s=f"{tps:.0f}")
                if log and (s.step % cfg.log_every == 0 or s.step == cfg.steps or s.step == 1 or out_of_time):
                    log.log({**asdict(s), "tokens_per_s": tps})
                if on_step is not None:
                    on_step(self, s)
                if s.step % cfg.save_every == 0 or s.step == cfg.steps or out_of_time:
                    self.save()
                    if main:
                        plot_losses(log.path, self.out / "loss_curve.png")
        finally:
            bar.close()
            if log:
                log.close()
        if cfg.export_ema and (self.step >= cfg.steps or out_of_time) and history:
            self.export()
        return history

    def _agreed(self, flag: bool) -> bool:
        """True on every rank once any rank says so (ranks' clocks differ; all must stop at one step)."""
        if not self.world.distributed:
            return flag
        return bool(all_reduce_sum(torch.tensor(float(flag), device=self.world.device)).item())
