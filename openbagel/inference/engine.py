"""The inference engine: fills KV caches with text and image blocks, decodes text, denoises images.

It speaks token ids, tensors and KV caches only (no PIL, no strings: that is the pipeline's job).
Every operation is batched over the rows of a cache: several tasks, or the guidance branches of one
task, run as one forward. During denoising everything that does not change between steps (masks,
RoPE tables, expert routing, position and boundary embeddings, the cache itself) is built once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..models.bagel import Bagel
from ..models.layers import KeySuffixes, rope_cos_sin
from ..models.qwen2_mot import ExpertRouting, KVSlot
from ..models.vae import AutoEncoder
from ..processing import patchify_image, patchify_latent, unpatchify_latent
from . import onednn
from .kv_cache import KVCache
from .sampler import FlowParams, cfg_active, cfg_combine, euler_step, timesteps
from .step_cache import StepCacheConfig

Row = tuple[KVCache, int]
MAX_UNMASKED_GROUPS = 4  # see generate_images: more groups of short blocks attend under one mask instead


@dataclass(frozen=True)
class TextParams:
    """Text decoding settings."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 100_000):
            raise ValueError(f"max new tokens must be an integer from 1 to 100000, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 100):
            raise ValueError(f"temperature must be a number in (0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")


@dataclass
class ImageJob:
    """One image to denoise and the contexts of its guidance branches.

    `text_ctx` is the context without the latest text (text guidance), `img_ctx` the one without
    images (image guidance). `img_ctx_is_cond` marks an image-guidance context identical to the
    conditional one (text-to-image without thinking): its velocity is then v_cond, computed once.
    """

    cond_ctx: Row
    text_ctx: Row | None
    img_ctx: Row | None
    height: int
    width: int
    params: FlowParams
    noise: torch.Tensor  # [h*w, patch_latent_dim] fp32, the initial x_1
    img_ctx_is_cond: bool = False


StepCallback = Callable[[int, float, list[torch.Tensor]], list[torch.Tensor] | None]


class Engine:
    def __init__(self, model: Bagel, vae: AutoEncoder, bos_id: int, eos_id: int,
                 start_of_image_id: int, end_of_image_id: int) -> None:
        self.model, self.vae = model, vae
        self.cfg = model.cfg
        if next(vae.parameters()).device.type in ("cpu", "cuda"):
            # oneDNN / cuDNN convolutions run faster channels-last (a small VAE decodes ~1.3x faster on CPU).
            vae.to(memory_format=torch.channels_last)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.soi_id, self.eoi_id = start_of_image_id, end_of_image_id
        # Denoising options (see docs/performance.md). `batch_guidance=False` runs the guidance branches
        # one forward each (for benchmarks); `compile_step` compiles the decoder layers' work around attention;
        # `step_cache` reuses velocities between full forwards (opt-in, approximate).
        self.batch_guidance = True
        self.compile_step = False
        self.step_cache: StepCacheConfig | None = None
        self._compiled_layers = None

    @property
    def device(self) -> torch.device:
        return self.model.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vae2llm.weight.dtype

    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        return KVCache.empty(self.cfg.llm, batch, capacity, self.device, self.dtype)

    # ----- one forward over a block ----------------------------------------------------------------

    def _forward_block(self, cache: KVCache, x: torch.Tensor, n: torch.Tensor, causal: bool,
                       gen_mask: torch.Tensor | None, commit: bool, advance: torch.Tensor) -> torch.Tensor:
        """Run block x [B, L, H] (row b has n[b] real tokens) against the cache; optionally keep it.

        Only the span of rows that have tokens is computed: an input image enters the `gen` rows but
        not the `cfg_img` rows after them, and padding those rows would double the prefill's FLOPs.
        """
        B, L, _ = x.shape
        cache.reserve(L)
        live = (n > 0).nonzero().flatten().tolist()
        if live and (live[0], live[-1] + 1) != (0, B):
            r0, r1 = live[0], live[-1] + 1
            part = cache.rows(r0, r1)
            hidden = x.new_zeros(x.shape)
            hidden[r0:r1] = self._forward_block(part, x[r0:r1], n[r0:r1], causal,
                                                None if gen_mask is None else gen_mask[r0:r1], commit, advance[r0:r1])
            cache.used = part.used
            return hidden
        positions = cache.rope[:, None].expand(B, L)
        if causal:
            positions = positions + torch.arange(L, device=x.device)[None]
        mask = self._block_mask(cache, n, L, causal)
        hidden = self.model.language_model.model(x, positions, mask, gen_mask=gen_mask, kv=cache.slots())
        if commit:
            cache.commit(torch.arange(L, device=x.device)[None] < n[:, None], advance)
        return hidden

    @staticmethod
    def _block_mask(cache: KVCache, n: torch.Tensor, L: int, causal: bool) -> torch.Tensor:
        """[B, 1, L, used + L]: valid cache slots, plus the block's own keys (causal or full)."""
        B = cache.batch
        i = torch.arange(L, device=n.device)
        j = torch.arange(L, device=n.device)
        block = (j[None, None, :] < n[:, None, None]).expand(B, L, L)
        if causal:
            block = block & (j[None, :] <= i[:, None])[None]
        block = block | torch.eye(L, dtype=torch.bool, device=n.device)[None]  # padded queries see themselves
        past = cache.valid[:, None, :cache.used].expand(B, L, cache.used)
        return torch.cat([past, block], dim=2)[:, None]

    # ----- prefill ---------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill_text(self, cache: KVCache, blocks: list[list[int]]) -> None:
        """Append one token block per row (empty list = nothing for that row); causal, one position each."""
        if len(blocks) != cache.batch:
            raise ValueError("one block per cache row is required")
        n = torch.tensor([len(b) for b in blocks], device=self.device)
        L = int(n.max())
        if L == 0:
            return
        ids = torch.zeros(cache.batch, L, dtype=torch.long, device=self.device)
        for r, b in enumerate(blocks):
            ids[r, :len(b)] = torch.tensor(b, dtype=torch.long)
        self._forward_block(cache, self.model.embed_text(ids), n, causal=True, gen_mask=None, commit=True, advance=n)

    def _boundary(self, tokens: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Wrap per-row token embeddings in start/end-of-image: rows [B, max+2, H] and real lengths."""
        B, H = len(counts), tokens.shape[-1]
        L = max(counts) + 2
        x = tokens.new_zeros(B, L, H)
        soi, eoi = self.model.embed_text(torch.tensor([self.soi_id, self.eoi_id], device=self.device))
        offset = 0
        for r, c in enumerate(counts):
            x[r, 0] = soi
            x[r, 1:1 + c] = tokens[offset:offset + c]
            x[r, 1 + c] = eoi
            offset += c
        return x, torch.tensor([c + 2 for c in counts], device=self.device)

    def _image_gen_mask(self, counts: list[int], L: int) -> torch.Tensor:
        j = torch.arange(L, device=self.device)[None]
        c = torch.tensor(counts, device=self.device)[:, None]
        return (j >= 1) & (j <= c)

    @torch.no_grad()
    def prefill_vae_images(self, cache: KVCache, images: list[torch.Tensor | None],
                           generators: list[torch.Generator | None] | None = None, sample: bool = True) -> None:
        """Append a clean VAE block per row (t = 0, generation expert, full attention); rope +1.

        The VAE samples its posterior (as the official code) with each row's generator.
        """
        rows = [r for r, img in enumerate(images) if img is not None]
        if not rows:
            return
        tokens, counts, pos = [], [], []
        ds = self.cfg.latent_downsample
        for r in rows:
            img = images[r]
            h, w = img.shape[1] // ds, img.shape[2] // ds
            gen = generators[r] if generators is not None else None
            z = self.vae.encode(img[None].to(self.device, next(self.vae.parameters()).dtype),
                                sample=sample, generator=gen)[0]
            tokens.append(patchify_latent(z, self.cfg.latent_patch_size).to(self.dtype))
            counts.append(h * w)
            pos.append(self.model.latent_grid_ids(h, w, self.device))
        zeros = torch.zeros(1, device=self.device)
        emb = self.model.embed_latents(torch.cat(tokens), zeros.expand(sum(counts)), torch.cat(pos))
        self._prefill_image_rows(cache, rows, emb, counts, gen=True)

    @torch.no_grad()
    def prefill_vit_images(self, cache: KVCache, images: list[torch.Tensor | None]) -> None:
        """Append a ViT block per row (understanding expert, full attention); rope +1."""
        rows = [r for r, img in enumerate(images) if img is not None]
        if not rows:
            return
        p = self.cfg.vit.patch_size
        patches, pos, counts = [], [], []
        for r in rows:
            img = images[r]
            h, w = img.shape[1] // p, img.shape[2] // p
            patches.append(patchify_image(img.to(self.device, self.dtype), p))
            pos.append(self.model.vit_grid_ids(h, w, self.device))
            counts.append(h * w)
        emb = self.model.embed_vit(torch.cat(patches), torch.cat(pos), counts)
        self._prefill_image_rows(cache, rows, emb, counts, gen=False)

    def _prefill_image_rows(self, cache: KVCache, rows: list[int], emb: torch.Tensor, counts: list[int],
                            gen: bool) -> None:
        all_counts = [0] * cache.batch
        for r, c in zip(rows, counts):
            all_counts[r] = c
        x, n = self._boundary(emb, [max(c, 0) for c in all_counts])
        present = torch.tensor([c > 0 for c in all_counts], device=self.device)
        n = torch.where(present, n, torch.zeros_like(n))
        gen_mask = self._image_gen_mask(all_counts, x.shape[1]) if gen else None
        self._forward_block(cache, x, n, causal=False, gen_mask=gen_mask, commit=True, advance=present.long())

    # ----- text decoding ---------------------------------------------------------------------------

    def token_budget(self, cache: KVCache, params: TextParams) -> int:
        """How many tokens `decode` may write: max_new_tokens, fewer where the model's positions run out.
        A row that wrote this many tokens without the end token was cut short."""
        room = self.cfg.llm.max_position_embeddings - int(cache.rope.max()) - 1
        return min(params.max_new_tokens, max(room, 0))

    @torch.no_grad()
    def decode(self, cache: KVCache, params: TextParams, generators: list[torch.Generator | None] | None = None,
               on_tokens: Callable[[list[list[int]]], None] | None = None) -> list[list[int]]:
        """Greedy or sampled decoding from each row (the cache is extended; fork it first to keep it).

        Feeds `<|im_start|>` at each row's position, then one token per step, until `<|im_end|>`,
        `max_new_tokens`, or the model's `max_position_embeddings` (positions it never saw in training).
        Returns the generated ids per row, without the end token.
        """
        B = cache.batch
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        token = torch.full((B,), self.bos_id, dtype=torch.long, device=self.device)
        one = torch.ones(B, dtype=torch.long, device=self.device)
        for _ in range(self.token_budget(cache, params)):
            x = self.model.embed_text(token[:, None])
            hidden = self._forward_block(cache, x, one, causal=True, gen_mask=None, commit=True, advance=one)
            logits = self.model.language_model.lm_head(hidden[:, -1]).float()
            token = sample_next(logits, params, generators)
            finished = token == self.eos_id
            for r in range(B):
                if not done[r] and not finished[r]:
                    out[r].append(int(token[r]))
            done |= finished
            if on_tokens is not None:
                on_tokens(out)
            if bool(done.all()):
                break
        return out

    # ----- image generation ------------------------------------------------------------------------

    @contextlib.contextmanager
    def recording_jobs(self) -> Iterator[list["ImageJob"]]:
        """Collect the ImageJobs denoised inside the block. Their contexts stay alive, so benchmarks and
        tests can denoise the very same jobs again through `generate_images` with other engine options."""
        recorded: list[ImageJob] = []
        original = self.generate_images

        def record(jobs: list[ImageJob], *args, **kwargs) -> list[torch.Tensor]:
            recorded.extend(jobs)
            return original(jobs, *args, **kwargs)

        self.generate_images = record  # type: ignore[method-assign]
        try:
            yield recorded
        finally:
            del self.generate_images

    @torch.no_grad()
    def generate_images(self, jobs: list[ImageJob], callback: StepCallback | None = None,
                        progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
        """Denoise all jobs together (same schedule); returns the final latent tokens of each job."""
        if not jobs:
            return []
        steps, shift = jobs[0].params.num_timesteps, jobs[0].params.timestep_shift
        if any((j.params.num_timesteps, j.params.timestep_shift) != (steps, shift) for j in jobs):
            raise ValueError("jobs generated together must share num_timesteps and timestep_shift")
        ds = self.cfg.latent_downsample
        counts = [(j.height // ds) * (j.width // ds) for j in jobs]

        # 1. Rows: every job's conditional branch first, then the guidance branches that need a forward.
        rows: list[Row] = [j.cond_ctx for j in jobs]
        row_job = list(range(len(jobs)))
        text_row: dict[int, int] = {}
        img_row: dict[int, int] = {}
        for k, j in enumerate(jobs):
            if j.params.uses_text_cfg and j.text_ctx is not None:
                text_row[k] = len(rows)
                rows.append(j.text_ctx)
                row_job.append(k)
            if j.params.uses_img_cfg and j.img_ctx is not None and not j.img_ctx_is_cond:
                img_row[k] = len(rows)
                rows.append(j.img_ctx)
                row_job.append(k)
        n_cond = len(jobs)

        # 2. Everything constant over the steps.
        L = max(counts) + 2
        cache = KVCache.stack(rows, extra=L)
        R = cache.batch
        row_counts = [counts[k] for k in row_job]
        n = torch.tensor([c + 2 for c in row_counts], device=self.device)
        # Full blocks against right-aligned caches attend without a mask, one call per group of rows that
        # share a context length (see KeySuffixes). That pays for few groups or long blocks; a batch of many
        # different prompts with small images runs faster as one masked call (16 edits at 64² on CPU: 5%).
        starts = cache.first_valid() if len(set(row_counts)) == 1 else None
        spans = KeySuffixes.from_starts(starts) if starts is not None else None
        if spans is not None and (len(spans.groups) <= MAX_UNMASKED_GROUPS or L >= 1024):
            mask: torch.Tensor | KeySuffixes = spans
        else:
            mask = self._block_mask(cache, n, L, causal=False)
        positions = cache.rope[:, None].expand(R, L)
        cos, sin = rope_cos_sin(positions, self.cfg.llm.head_dim, self.cfg.llm.rope_theta, self.dtype)
        gen_mask = self._image_gen_mask(row_counts, L)
        soi, eoi = self.model.embed_text(torch.tensor([self.soi_id, self.eoi_id], device=self.device))
        pos_emb = [self.model.latent_pos_embed(self.model.latent_grid_ids(j.height // ds, j.width // ds, self.device))
                   for j in jobs]
        block = torch.zeros(len(jobs), L, self.cfg.llm.hidden_size, device=self.device, dtype=self.dtype)
        for k, c in enumerate(counts):
            block[k, 0], block[k, c + 1] = soi, eoi
        row_index = torch.tensor(row_job, device=self.device)
        slots = cache.slots()

        def forwards(rows: int) -> list[tuple[slice, torch.Tensor | KeySuffixes, list[KVSlot], torch.Tensor, torch.Tensor,
                                              ExpertRouting]]:
            """The forwards of a step over rows [0, rows) with their fixed inputs: one batched call, or one a row."""
            parts = [slice(0, rows)] if self.batch_guidance else [slice(r, r + 1) for r in range(rows)]
            return [(s, _rows(mask, s), [_view(sl, s) for sl in slots], cos[s], sin[s], ExpertRouting.from_mask(gen_mask[s]))
                    for s in parts]

        plans = {R: forwards(R), n_cond: forwards(n_cond)}  # guided steps run every row, the others the jobs'
        step_fn = self._step_fn()
        reuse = self.step_cache.start(steps - 1) if self.step_cache is not None else None

        ts = timesteps(steps, shift)
        dts = ts[:-1] - ts[1:]
        xs = [j.noise.to(self.device, torch.float32) for j in jobs]
        for i in range(steps - 1):
            t = float(ts[i])
            any_cfg = any(cfg_active(t, j.params.cfg_interval) and (k in text_row) for k, j in enumerate(jobs))
            r_now = R if any_cfg else n_cond
            # 3. Query embeddings once per job; guidance rows reuse their job's.
            temb = self.model.time_embedder(ts[i:i + 1].to(self.device))
            for k, (x, c) in enumerate(zip(xs, counts)):
                block[k, 1:1 + c] = self.model.vae2llm(x.to(self.dtype)) + temb + pos_emb[k]
            # 4. Raw velocities of every row (all guidance branches): one batched forward, or predicted.
            v_rows = reuse.predict(i, t, r_now, block) if reuse is not None else None
            if v_rows is None:
                h_in = block if r_now == len(jobs) else block[row_index[:r_now]]
                hidden = torch.cat([step_fn(h_in[s], rows_mask, kv, cos_s, sin_s, routing)
                                    for s, rows_mask, kv, cos_s, sin_s, routing in plans[r_now]])
                v_rows = self.model.llm2vae(hidden).float()
                if reuse is not None:
                    reuse.update(t, v_rows)
            # 5. Guidance and Euler step per job.
            for k, j in enumerate(jobs):
                c = counts[k]
                v_cond = v_rows[k, 1:1 + c]
                v = v_cond
                if any_cfg and cfg_active(t, j.params.cfg_interval) and k in text_row:
                    v_text = v_rows[text_row[k], 1:1 + c]
                    v_img = None
                    if j.params.uses_img_cfg:
                        v_img = v_cond if j.img_ctx_is_cond else (v_rows[img_row[k], 1:1 + c] if k in img_row else None)
                    p = j.params
                    v = cfg_combine(v_cond, v_text, v_img, p.cfg_text_scale, p.cfg_img_scale,
                                    p.cfg_renorm_type, p.cfg_renorm_min)
                xs[k] = euler_step(xs[k], v, dts[i])
            if callback is not None:
                replaced = callback(i, t, xs)
                if replaced is not None:
                    xs = list(replaced)
            if progress is not None:
                progress(i + 1, steps - 1)
        return xs

    def _step_fn(self) -> Callable[..., torch.Tensor]:
        """The denoising forward of a block of rows against their caches (optionally compiled)."""
        lm = self.model.language_model.model
        layers = None
        if self.compile_step:
            if self._compiled_layers is None:
                onednn.unpack_linears(lm)  # Inductor packs the weights of what it compiles itself
                self._compiled_layers = [CompiledLayer(layer) for layer in lm.layers]
            layers = self._compiled_layers

        def step(x, mask, kv, cos, sin, routing):
            return lm(x, None, mask, kv=kv, rope=(cos, sin), routing=routing, layers=layers)

        return step

    @torch.no_grad()
    def decode_latents(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latent tokens -> image [3, H, W] in [-1, 1] through the VAE."""
        ds, p = self.cfg.latent_downsample, self.cfg.latent_patch_size
        z = unpatchify_latent(tokens, height // ds, width // ds, p, self.cfg.vae.z_channels)
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z[None].to(self.device, vae_dtype))[0].float()


class CompiledLayer:
    """A decoder layer whose halves around attention are torch.compile'd with static shapes.

    Regional compilation: all layers share the two compiled graphs (one per block shape: rows x tokens),
    so compiling costs about one layer's time. Attention and the KV-cache write stay eager: their key
    length changes with every prompt, which would otherwise recompile or force slower dynamic-shape code.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.before = torch.compile(layer.before_attention, dynamic=False)
        self.after = torch.compile(layer.after_attention, dynamic=False)

    def __call__(self, x, cos, sin, mask, routing: ExpertRouting, kv: KVSlot | None) -> torch.Tensor:
        q, k, v = self.before(x, cos, sin, routing)
        return self.after(x, self.layer.self_attn.attend(q, k, v, mask, kv), routing)


def _rows(mask: torch.Tensor | KeySuffixes, rows: slice) -> torch.Tensor | KeySuffixes:
    return mask.rows(rows) if isinstance(mask, KeySuffixes) else mask[rows]


def _view(slot: KVSlot, rows: slice) -> KVSlot:
    """Some rows of a layer's KV slot (a view: writes land in the shared cache)."""
    return KVSlot(slot.k[rows], slot.v[rows], slot.start)


def sample_next(logits: torch.Tensor, params: TextParams,
                generators: list[torch.Generator | None] | None) -> torch.Tensor:
    """Next token per row: argmax, or temperature / top-k / top-p sampling (each row its own generator)."""
    if not params.do_sample:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    gens = generators or [None] * probs.shape[0]
    picks = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)]
    return torch.cat(picks).to(logits.device)
