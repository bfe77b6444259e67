"""Qwen2 decoder with Mixture-of-Transformers layers (BAGEL's language model).

Every layer holds two experts with identical shapes: the understanding expert (text and ViT tokens,
the plain Qwen2 names) and the generation expert (VAE latent tokens, names suffixed `_moe_gen`).
Each token uses its own expert's norms, Q/K/V/O projections, QK-norms and MLP; one attention runs
over all tokens. Inputs are padded rows `[B, L, H]` (a row may pack several samples; the attention
mask carries document and causal/full/noise rules), so training and inference share this code.
The module is single-device and pure: parallelism, compile and quantisation are applied from outside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LLMConfig
from .layers import KeySuffixes, RMSNorm, SwiGLU, apply_rope, attention, rope_cos_sin


@dataclass
class ExpertRouting:
    """Which flattened token positions of a [B, L] block use the generation expert.

    `gen_cols` = (a, b) when every row's generation tokens are exactly columns a..b-1 (a denoising
    block: boundary token, latents, boundary token): slices then replace the gather and scatter.
    Otherwise `gen` / `und` are index tensors into the flattened block; `None` for `gen` means every
    token uses the understanding expert (text and ViT blocks), which skips the gather entirely.
    """

    und: torch.Tensor | None
    gen: torch.Tensor | None
    gen_cols: tuple[int, int] | None = None

    @classmethod
    def from_mask(cls, gen_mask: torch.Tensor | None) -> "ExpertRouting":
        if gen_mask is None or not bool(gen_mask.any()):
            return cls(und=None, gen=None)
        if bool((gen_mask == gen_mask[:1]).all()):  # every row routes the same columns (packed rows may not)
            cols = gen_mask[0].nonzero().flatten()
            a, b = int(cols[0]), int(cols[-1]) + 1
            if b - a == cols.numel():
                return cls(und=None, gen=None, gen_cols=(a, b))
        return cls.by_index(gen_mask)

    @classmethod
    def by_index(cls, gen_mask: torch.Tensor) -> "ExpertRouting":
        """The general gather / scatter routing of any mask."""
        flat = gen_mask.flatten()
        return cls(und=(~flat).nonzero().squeeze(1), gen=flat.nonzero().squeeze(1))

    def apply(self, x: torch.Tensor, und_fn, gen_fn) -> torch.Tensor:
        """Run `und_fn` on understanding rows and `gen_fn` on generation rows of x [B, L, C]."""
        B, L, C = x.shape
        if self.gen_cols is not None:
            a, b = self.gen_cols
            if (L - (b - a)) * 64 <= L:
                # A few boundary tokens around many latents: run the generation expert on the whole block
                # (wasting < 2% on the boundary) and overwrite the boundary, instead of copying the latents
                # out of the block and the result back in (two full-size copies per call).
                out = gen_fn(x)
            else:
                # One contiguous [B * n, C] input: a strided [B, n, C] view would run as B separate GEMMs.
                gen_out = gen_fn(x[:, a:b].reshape(B * (b - a), C))
                out = x.new_empty(B, L, gen_out.shape[-1], dtype=gen_out.dtype)
                out[:, a:b] = gen_out.view(B, b - a, -1)
            if b - a < L:
                und_out = und_fn(torch.cat([x[:, :a], x[:, b:]], dim=1))
                out[:, :a], out[:, b:] = und_out[:, :a], und_out[:, a:]
            return out
        if self.gen is None:
            return und_fn(x)
        flat = x.reshape(B * L, C)
        gen_out = gen_fn(flat[self.gen])
        out = flat.new_empty(B * L, gen_out.shape[-1], dtype=gen_out.dtype)
        out[self.gen] = gen_out
        if self.und.numel():
            out[self.und] = und_fn(flat[self.und])
        return out.view(B, L, -1)


class KVSlot:
    """Where a layer finds past keys/values and where it writes this block's (see inference.kv_cache)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        self.k, self.v, self.start = k, v, start  # k/v [B, Hkv, capacity, D]; block written at start


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(H, cfg.num_attention_heads * D, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(H, cfg.num_key_value_heads * D, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(H, cfg.num_key_value_heads * D, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(cfg.num_attention_heads * D, H, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity())
            setattr(self, f"k_norm{suffix}", RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity())

    def _qkv(self, suffix: str):
        qp, kp, vp = (getattr(self, f"{n}_proj{suffix}") for n in "qkv")
        qn, kn = getattr(self, f"q_norm{suffix}"), getattr(self, f"k_norm{suffix}")
        D = self.head_dim

        def project(x: torch.Tensor) -> torch.Tensor:  # x [..., H] -> [..., (Hq + 2 Hkv) * D]
            lead = x.shape[:-1]
            q = qn(qp(x).view(*lead, -1, D)).view(*lead, -1)  # QK-norm per head
            k = kn(kp(x).view(*lead, -1, D)).view(*lead, -1)
            return torch.cat([q, k, vp(x)], dim=-1)

        return project

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                routing: ExpertRouting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values of x [B, L, H] by each token's expert, RoPE applied: [B, heads, L, D]."""
        B, L, _ = x.shape
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = routing.apply(x, self._qkv(""), self._qkv("_moe_gen"))
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, L, Hq, D).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, L, Hkv, D).transpose(1, 2), cos, sin)
        return q, k, v.view(B, L, Hkv, D).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | KeySuffixes | None,
               kv: KVSlot | None) -> torch.Tensor:
        """Attention of the block over the cache (written into it first) and itself: [B, L, Hq * D]."""
        B, _, L, _ = q.shape
        if kv is not None:
            end = kv.start + L
            kv.k[:, :, kv.start:end] = k
            kv.v[:, :, kv.start:end] = v
            k, v = kv.k[:, :, :end], kv.v[:, :, :end]
        return attention(q, k, v, mask).transpose(1, 2).reshape(B, L, -1)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, routing: ExpertRouting, kv: KVSlot | None) -> torch.Tensor:
        q, k, v = self.before_attention(x, cos, sin, routing)
        return self.after_attention(x, self.self_attn.attend(q, k, v, mask, kv), routing)

    # The halves around attention: their shapes depend on the block only, not on the cache length, so
    # they compile to static graphs (inference/engine.py) while attention stays eager.
    def before_attention(self, x, cos, sin, routing: ExpertRouting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = routing.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        return self.self_attn.project(h, cos, sin, routing)

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        x = x + routing.apply(attn, self.self_attn.o_proj, self.self_attn.o_proj_moe_gen)
        h = routing.apply(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + routing.apply(h, self.mlp, self.mlp_moe_gen)


class Qwen2MoTModel(nn.Module):
    """`language_model.model`: token embedding, MoT layers, the two final norms."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        gen_mask: torch.Tensor | None = None,
        kv: list[KVSlot] | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing: ExpertRouting | None = None,
        layers: list[Callable[..., torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """x [B, L, H] embedded tokens; position_ids [B, L]; mask bool [B, 1, L, S] (or KeySuffixes);
        returns normed hidden.

        `rope` (cos, sin) and `routing` may be passed precomputed by callers that reuse them across calls;
        `layers` replaces self.layers by wrappers of them (inference.engine.CompiledLayer, for one).
        """
        if routing is None:
            routing = ExpertRouting.from_mask(gen_mask)
        if rope is None:
            rope = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cos, sin = rope
        for i, layer in enumerate(self.layers if layers is None else layers):
            slot = kv[i] if kv is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, routing, slot, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, routing, slot)
        return routing.apply(x, self.norm, self.norm_moe_gen)


class Qwen2MoTForCausalLM(nn.Module):
    """`language_model`: the decoder plus an untied `lm_head`."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
