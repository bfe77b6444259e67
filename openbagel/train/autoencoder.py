"""Stage 1 of the embedded model: a small FLUX-architecture autoencoder trained on Shapes renders.

The autoencoder carries the rendering (crisp edges, exact colours), so the transformer only has to
place 16 latent tokens. Reconstruction is L1 + MSE on posterior samples (so the posterior variance
learns to be small, since BAGEL samples it at inference); afterwards `scale_factor`/`shift_factor` are
set so that latents have zero mean and unit variance, as FLUX's constants do for its own data.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import VAEConfig
from ..models.vae import AutoEncoder
from ..processing import to_tensor
from ..shapes.render import render
from ..shapes.tasks import random_scene


@dataclass
class AutoencoderRecipe:
    vae: VAEConfig
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    mean_penalty: float = 1e-4
    foreground_weight: float = 8.0  # extra loss weight on object pixels (most pixels are background)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_every: int = 250  # calibrate and write a usable autoencoder this often
    polish_steps: int = 0  # then train the decoder alone (latents stay fixed) with a short annealed schedule
    polish_lr: float = 3e-4
    outline_weight: float = 0.0  # polish only: extra loss weight on the pixels along an object's outline


def shapes_batch(rng: random.Random, n: int) -> torch.Tensor:
    """Random scenes of 0-9 objects, weighted toward the 1-4 of generated sources."""
    counts = [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9]
    return torch.stack([to_tensor(render(random_scene(rng, rng.choice(counts)))) for _ in range(n)])


def foreground(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] mask of pixels that differ from the image's corner (background) colour."""
    return (x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True).gt(0.01).float()


def outline(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] pixels within one pixel of a foreground mask's edge (dilation minus erosion)."""
    dilated = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1)
    eroded = -torch.nn.functional.max_pool2d(-mask, 3, stride=1, padding=1)
    return dilated - eroded


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], as 8-bit images."""
    mse = ((a.clamp(-1, 1) - b) * 127.5).pow(2).mean().item()
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def train_autoencoder(recipe: AutoencoderRecipe, out_dir: str | Path, log=print) -> tuple[AutoEncoder, dict]:
    """Train, calibrate the latent scale/shift, save `ae.safetensors` + `ae_config.json`; returns metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    # Train with unit scale/shift; the real constants are measured afterwards.
    cfg = replace(recipe.vae, scale_factor=1.0, shift_factor=0.0)
    ae = AutoEncoder(cfg)
    history: list[dict] = []
    start = time.time()
    _fit(ae, list(ae.parameters()), recipe, recipe.steps, recipe.lr, rng, history, log,
         save=lambda: save_autoencoder(ae, recipe, out_dir, history, time.time() - start))
    metrics = save_autoencoder(ae, recipe, out_dir, history, time.time() - start)
    if recipe.polish_steps:
        metrics = polish_decoder(recipe, out_dir, log)
    return ae, metrics


def polish_decoder(recipe: AutoencoderRecipe, out_dir: str | Path, log=print) -> dict:
    """Train only the decoder of the saved autoencoder: sharper renders of the very same latents.

    The encoder, hence the latent space the transformer learns, is untouched, so this stage can run
    before, during or after the unified training, and again. `outline_weight` is what makes the small
    shapes come out right: the pixels along an outline are few, and they are where a small diamond and a
    small circle differ. Marks `ae_metrics.json` with `polished_steps` and `outline_weight`.
    """
    out_dir = Path(out_dir)
    ae = AutoEncoder(replace(recipe.vae, scale_factor=1.0, shift_factor=0.0))
    ae.load_state_dict(load_file(str(out_dir / "ae.safetensors")))
    ae.encoder.requires_grad_(False)
    before = json.loads((out_dir / "ae_metrics.json").read_text())
    history = before.get("history", [])
    done = len(history)
    start = time.time()
    rng = random.Random(recipe.seed + 7)
    _fit(ae, list(ae.decoder.parameters()), recipe, recipe.polish_steps, recipe.polish_lr, rng, history, log,
         save=lambda: None, outline_weight=recipe.outline_weight)
    for rec in history[done:]:
        rec["stage"] = "decoder polish" + (f", outline weight {recipe.outline_weight:g}" if recipe.outline_weight else "")
    constants = json.loads((out_dir / "ae_config.json").read_text())
    return save_autoencoder(ae, recipe, out_dir, history, before.get("train_seconds", 0.0) + time.time() - start,
                            constants=(constants["scale_factor"], constants["shift_factor"]),
                            extra={"polished_steps": before.get("polished_steps", 0) + recipe.polish_steps,
                                   "outline_weight": recipe.outline_weight})


def _fit(ae: AutoEncoder, params: list, recipe: AutoencoderRecipe, steps: int, lr: float, rng: random.Random,
         history: list[dict], log, save, outline_weight: float = 0.0) -> None:
    """Warm-up + cosine AdamW on L1 + MSE (object pixels, and optionally their outlines, weighted up) of
    posterior samples."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start = time.time()
    for step in range(1, steps + 1):
        x = shapes_batch(rng, recipe.batch_size)
        mean, logvar = ae.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        y = ae.decoder(z)
        fg = foreground(x)
        w = 1.0 + recipe.foreground_weight * fg
        if outline_weight:  # the polish only; the main training skips the two pooling passes
            w = w + outline_weight * outline(fg)
        err = y - x
        loss = ((err.abs() + err.pow(2)) * w).sum() / (w.sum() * 3) + recipe.mean_penalty * mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        if step % recipe.log_every == 0 or step == steps:
            rec = {"step": step, "loss": loss.item(), "psnr": psnr(y.detach(), x),
                   "logvar": logvar.mean().item(), "elapsed_s": time.time() - start}
            history.append(rec)
            log(json.dumps(rec))
        if step % recipe.save_every == 0 and step < steps:
            m = save()
            if m:
                log(json.dumps({"step": step, "psnr_db": m["psnr_db"], "detector_exact": m["detector_exact"]}))


def save_autoencoder(ae: AutoEncoder, recipe: AutoencoderRecipe, out_dir: Path, history: list, seconds: float,
                     constants: tuple[float, float] | None = None, extra: dict | None = None) -> dict:
    """Calibrate scale/shift on fresh scenes (or keep the given `constants`: the latent space a transformer
    was trained on), then write ae.safetensors, ae_config.json, ae_metrics.json."""
    ae.eval()
    metrics = calibrate_and_evaluate(ae, random.Random(recipe.seed + 1))
    ae.train()
    if constants is not None:
        metrics["scale_factor"], metrics["shift_factor"] = constants
    metrics.update(extra or {})
    metrics["train_seconds"] = seconds
    metrics["history"] = history
    final_cfg = replace(recipe.vae, scale_factor=metrics["scale_factor"], shift_factor=metrics["shift_factor"])
    tmp = out_dir / "ae.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in ae.state_dict().items()}, str(tmp))
    tmp.replace(out_dir / "ae.safetensors")
    (out_dir / "ae_config.json").write_text(json.dumps(asdict(final_cfg), indent=2) + "\n")
    (out_dir / "ae_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def calibrate_and_evaluate(ae: AutoEncoder, rng: random.Random, n: int = 512) -> dict:
    """Latent statistics (for scale/shift) and reconstruction PSNR / detector accuracy on fresh scenes."""
    from ..shapes.detect import detect
    from ..processing import to_pil

    xs = [shapes_batch(rng, 64) for _ in range(n // 64)]
    zs = [ae.posterior(x)[0] for x in xs]
    z = torch.cat(zs)
    shift = z.mean().item()
    scale = 1.0 / z.std().item()
    ps, exact, total = [], 0, 0
    for x, zz in zip(xs, zs):
        y = ae.decoder(zz)
        ps.append(psnr(y, x))
        for xi, yi in zip(x, y):
            exact += int(detect(to_pil(yi)) == detect(to_pil(xi)))
            total += 1
    return {"shift_factor": shift, "scale_factor": scale, "psnr_db": sum(ps) / len(ps),
            "detector_exact": exact / total}
