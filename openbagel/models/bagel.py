"""Bagel: the unified model. Embeds text, ViT and VAE tokens, runs the MoT decoder, and holds the heads.

Submodule names equal the official state-dict prefixes (`language_model`, `vit_model`, `connector`,
`vit_pos_embed`, `time_embedder`, `vae2llm`, `llm2vae`, `latent_pos_embed`). The VAE lives beside it
(`ae.safetensors` is a separate file). `forward_train` computes the two losses of a packed batch;
the inference engine composes the embedding helpers and the decoder itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BagelConfig
from ..data.batch import TEXT, VAE, VIT, PackedBatch
from ..processing import patchify_latent, target_size
from .layers import MLPConnector, PositionEmbedding, TimestepEmbedder, grid_position_ids
from .qwen2_mot import Qwen2MoTForCausalLM
from .siglip import SiglipNaViT
from .vae import AutoEncoder


@dataclass
class LossTerms:
    """Unnormalised loss sums and their token counts; the trainer normalises across ranks."""

    ce_sum: torch.Tensor
    ce_count: torch.Tensor
    mse_sum: torch.Tensor
    mse_count: torch.Tensor


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-time shift t' = s t / (1 + (s - 1) t): s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.vit_model = SiglipNaViT(cfg.vit, cfg.vit_max_num_patch_per_side)
        self.connector = MLPConnector(cfg.vit.hidden_size, H)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, H)
        self.time_embedder = TimestepEmbedder(H)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, H)
        self.llm2vae = nn.Linear(H, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, H)

    # ----- initialisation ------------------------------------------------------------------------

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None,
                     only: Sequence[str] = ()) -> None:
        """Random init for training from scratch: normal linears/embeddings, unit norms, fixed sin-cos tables.
        `only` (parameter-name prefixes such as "vit_model.") limits it to those parts of a loaded model."""
        prefixes = tuple(only)

        def chosen(name: str) -> bool:
            return not prefixes or name.startswith(prefixes)

        names = [name for name, _ in self.named_parameters()]
        unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in names)]
        if unmatched:
            raise ValueError(f"no parameter name starts with {unmatched}; prefixes look like 'vit_model.'")
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("pos_embed") or not chosen(name):
                    continue
                if p.ndim >= 2:
                    p.normal_(0.0, std, generator=generator)
                elif "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            if chosen("llm2vae.weight"):
                self.llm2vae.weight.zero_()  # as the official recipe: the velocity head starts at zero
            if not prefixes:
                self.vit_pos_embed.reset_parameters()
                self.latent_pos_embed.reset_parameters()

    def centre_position_tables(self, scale: float, tables: tuple[str, ...] = ("vit", "latent")) -> None:
        """The sin-cos tables named in `tables` ("vit", "latent") centred on the token grids of the default
        image size and scaled: a training-time choice for small grids, where the plain tables barely tell
        cells apart; the tables stay frozen tensors in the official layout."""
        unknown = set(tables) - {"vit", "latent"}
        if unknown:
            raise ValueError(f"unknown position tables {sorted(unknown)}: choose from 'vit', 'latent'")
        height, width = self.cfg.default_image_size
        if "vit" in tables:
            vit_w, vit_h = target_size(width, height, self.cfg.vit_transform)
            p = self.cfg.vit.patch_size
            self.vit_pos_embed.reset_parameters(self.vit_grid_ids(vit_h // p, vit_w // p), scale)
        if "latent" in tables:
            down = self.cfg.latent_downsample
            self.latent_pos_embed.reset_parameters(self.latent_grid_ids(height // down, width // down), scale)

    def copy_und_to_gen(self) -> None:
        """Initialise every `_moe_gen` twin from its understanding weight (the official `init_moe`)."""
        params = dict(self.language_model.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if "_moe_gen" in name:
                    p.copy_(params[name.replace("_moe_gen", "")])

    # ----- embeddings ----------------------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """Packed ViT patches -> LLM-width tokens: connector(SigLIP) + the fixed 2-D table."""
        features = self.vit_model(patches, position_ids, seqlens)
        return self.connector(features) + self.vit_pos_embed(position_ids)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Latent tokens [N, 64] at flow times t [N] (0 for clean context) -> LLM-width tokens."""
        return self.vae2llm(x) + self.time_embedder(t) + self.latent_pos_embed(position_ids)

    def latent_grid_ids(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        return grid_position_ids(h, w, self.cfg.max_latent_size, device)

    def vit_grid_ids(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        return grid_position_ids(h, w, self.cfg.vit_max_num_patch_per_side, device)

    @torch.no_grad()
    def encode_latents(self, vae: AutoEncoder, images: list[torch.Tensor], sample: bool = True,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [3, H, W] in [-1, 1] -> packed latent tokens [sum h*w, patch_latent_dim] (VAE frozen).
        Images of one size go through the VAE together: a batch holds hundreds of small images, and one
        call each would cost more in per-operation overhead than in arithmetic (on a GPU, most of a step)."""
        dtype = next(vae.parameters()).dtype
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape), []).append(i)
        tokens: dict[int, torch.Tensor] = {}
        for indices in by_size.values():
            z = vae.encode(torch.stack([images[i] for i in indices]).to(dtype), sample=sample, generator=generator)
            tokens.update(zip(indices, patchify_latent(z, self.cfg.latent_patch_size).unbind(0)))  # views
        return torch.cat([tokens[i] for i in range(len(images))]).to(self.vae2llm.weight.dtype)

    # ----- training ------------------------------------------------------------------------------

    def forward_train(self, batch: PackedBatch, noise_generator: torch.Generator | None = None,
                      timestep_shift: float | None = None) -> LossTerms:
        """Losses of a packed batch: next-token CE on text, rectified-flow velocity MSE on noisy latents."""
        if batch.latents is None and batch.mse_mask.numel():
            raise ValueError("batch.latents is empty: encode batch.vae_images with encode_latents first")
        kind = batch.token_kind
        B, L = kind.shape
        H = self.cfg.llm.hidden_size
        dtype = self.vae2llm.weight.dtype
        x = torch.zeros(B, L, H, dtype=dtype, device=kind.device)
        text = kind == TEXT
        x[text] = self.embed_text(batch.text_ids[text])
        if batch.vit_seqlens:
            x[kind == VIT] = self.embed_vit(batch.vit_patches.to(dtype), batch.vit_position_ids, batch.vit_seqlens)
        vae_tokens = kind == VAE
        target = None
        if vae_tokens.any():
            x0 = batch.latents
            t = torch.sigmoid(batch.timesteps_raw.float())
            t = shift_timesteps(t, timestep_shift if timestep_shift is not None else self.cfg.timestep_shift)
            eps = torch.randn(x0.shape, generator=noise_generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
            tt = t[:, None].to(x0.dtype)
            x_t = (1 - tt) * x0 + tt * eps
            x[vae_tokens] = self.embed_latents(x_t, t, batch.latent_position_ids)
            target = (eps - x0)[batch.mse_mask]
        hidden = self.language_model.model(x, batch.position_ids, batch.attn_mask, gen_mask=vae_tokens)

        ce_pos = batch.labels != -100
        zero = hidden.new_zeros(())
        if ce_pos.any():
            logits = self.language_model.lm_head(hidden[ce_pos]).float()
            ce = F.cross_entropy(logits, batch.labels[ce_pos], reduction="none")
            w = batch.ce_weights[ce_pos].float()
            ce_sum, ce_count = (ce * w).sum(), w.sum()
        else:
            ce_sum, ce_count = zero.float(), zero.float()
        if target is not None and target.numel():
            pred = self.llm2vae(hidden[vae_tokens][batch.mse_mask]).float()
            mse_sum = ((pred - target.float()) ** 2).mean(-1).sum()
            mse_count = hidden.new_tensor(float(target.shape[0]), dtype=torch.float32)
        else:
            mse_sum, mse_count = zero.float(), zero.float()
        return LossTerms(ce_sum, ce_count, mse_sum, mse_count)
