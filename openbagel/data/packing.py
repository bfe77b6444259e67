"""Samples -> `PackedBatch`: token layout, attention masks, RoPE ids, labels, CFG dropout, token budgets.

Each sample becomes a list of *splits* (reference section 2.3): a text block is one `causal` split,
an image used as context one `full` split, a generation target one `noise` split. `tokenize` turns one
sample into per-token arrays; `Packer` groups tokenized samples into rows under a token budget and
rows into batches; `collate` lays the rows out as a `PackedBatch` and builds the dense mask.

All randomness of a sample (CFG dropout, timestep draws) comes from a generator seeded with
(seed, sample index), so a batch depends only on which samples it holds: a resumed run reproduces it
exactly. Ranks deal the sample stream out by index, so another number of ranks packs other batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..config import BagelConfig
from ..models.layers import grid_position_ids
from ..processing import patchify_image, resize, to_rgb, to_tensor
from ..tokenizer import BagelTokenizer
from .batch import PAD, TEXT, VAE, VIT, PackedBatch
from .interleaved import ImageItem, Sample, TextItem

# Attention modes of a split (reference section 2.3).
CAUSAL, FULL, NOISE = 0, 1, 2
IGNORE = -100

# A data source: `source(start, step)` yields (index, sample) for indices start, start+step, ...
Source = Callable[[int, int], Iterable[tuple[int, Sample]]]


@dataclass
class PackingConfig:
    """Token budgets (official names) and CFG dropout probabilities."""

    expected_num_tokens: int = 10240  # a row stops taking samples once it holds this many tokens
    max_num_tokens: int = 11520  # hard limit on a row's length
    max_num_tokens_per_sample: int = 10240  # longer samples are skipped
    rows_per_batch: int = 1  # rows of one micro-batch (ignored when batch_tokens is set)
    batch_tokens: int | None = None  # else: add rows until the batch holds this many real tokens
    max_buffer: int = 50  # samples that did not fit a row wait here; a full buffer closes the row
    pad_to_multiple: int = 8  # row length rounded up (pad_to_max: always max_num_tokens, static shapes)
    pad_to_max: bool = False
    text_cond_dropout_prob: float = 0.1
    vae_cond_dropout_prob: float = 0.3
    vit_cond_dropout_prob: float = 0.3

    def __post_init__(self) -> None:
        if self.rows_per_batch < 1:
            raise ValueError(f"packing.rows_per_batch must be >= 1, got {self.rows_per_batch}")
        if not 0 < self.expected_num_tokens <= self.max_num_tokens:
            raise ValueError("need 0 < expected_num_tokens <= max_num_tokens")
        if self.max_num_tokens_per_sample > self.max_num_tokens:
            raise ValueError("max_num_tokens_per_sample cannot exceed max_num_tokens (a sample must fit a row)")
        for name in ("text_cond_dropout_prob", "vae_cond_dropout_prob", "vit_cond_dropout_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")


@dataclass
class SampleTokens:
    """One tokenized sample: per-token lists plus its packed image data."""

    index: int
    kind: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    split: list[int] = field(default_factory=list)  # split number of each token within the sample
    mode: list[int] = field(default_factory=list)  # attention mode of each token's split
    vit_patches: list[torch.Tensor] = field(default_factory=list)  # per ViT image [n, p*p*3]
    vit_position_ids: list[torch.Tensor] = field(default_factory=list)
    vae_images: list[torch.Tensor] = field(default_factory=list)  # per VAE split [3, H, W]
    latent_position_ids: list[torch.Tensor] = field(default_factory=list)
    timesteps_raw: list[torch.Tensor] = field(default_factory=list)  # per VAE split, [n] (-inf = clean)

    @property
    def num_tokens(self) -> int:
        return len(self.kind)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one sample's random choices, a pure function of (seed, index)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


class _Builder:
    """Appends splits to a `SampleTokens`, keeping the RoPE counter (reference section 2.5)."""

    def __init__(self, out: SampleTokens, tok: BagelTokenizer) -> None:
        self.out, self.tok, self.rope, self.splits = out, tok, 0, 0

    def text(self, ids: list[int], loss: bool) -> None:
        o, n = self.out, len(ids) + 2
        o.kind += [TEXT] * n
        o.text_ids += [self.tok.bos_id, *ids, self.tok.eos_id]
        o.position_ids += range(self.rope, self.rope + n)
        # Standard shift: <|im_start|> + text predict text + <|im_end|>; the last position predicts nothing.
        o.labels += [*ids, self.tok.eos_id, IGNORE] if loss else [IGNORE] * n
        self._split(n, CAUSAL)
        self.rope += n

    def image(self, kind: int, n: int, mode: int) -> None:
        """`<|vision_start|> n image tokens <|vision_end|>`, all at the current RoPE id."""
        o = self.out
        o.kind += [TEXT, *[kind] * n, TEXT]
        o.text_ids += [self.tok.start_of_image_id, *[0] * n, self.tok.end_of_image_id]
        o.position_ids += [self.rope] * (n + 2)
        o.labels += [IGNORE] * (n + 2)
        self._split(n + 2, mode)

    def _split(self, n: int, mode: int) -> None:
        self.out.split += [self.splits] * n
        self.out.mode += [mode] * n
        self.splits += 1


def tokenize(sample: Sample, index: int, tokenizer: BagelTokenizer, model_cfg: BagelConfig,
             cfg: PackingConfig, seed: int) -> SampleTokens:
    """Lay one interleaved sample out as splits, with its CFG dropout and timestep draws.

    CFG dropout only touches the conditioning of image generation: in a sample without a noisy
    target nothing is dropped (dropping an understanding sample's image or question would train the
    model to answer blind), and text that carries loss is never dropped.
    """
    gen = sample_generator(seed, index)
    out = SampleTokens(index=index)
    b = _Builder(out, tokenizer)
    has_target = any(isinstance(item, ImageItem) and item.loss for item in sample)

    def dropped(prob: float) -> bool:
        return has_target and prob > 0 and float(torch.rand((), generator=gen)) < prob

    for item in sample:
        if isinstance(item, TextItem):
            if not item.loss and dropped(cfg.text_cond_dropout_prob):
                continue  # a dropped text takes no RoPE position
            b.text(tokenizer.encode(item.text), item.loss)
        elif isinstance(item, ImageItem):
            if not (item.loss or item.vae or item.vit):
                raise ValueError("an ImageItem must be a target (loss=True) or a context (vae or vit)")
            image = to_rgb(item.image)
            if item.loss or item.vae:
                _add_vae(b, image, item, model_cfg, gen, dropped(cfg.vae_cond_dropout_prob))
            if item.vit:
                if dropped(cfg.vit_cond_dropout_prob):
                    b.rope += 1  # a dropped context image still takes its position
                else:
                    _add_vit(b, image, model_cfg)
        else:
            raise TypeError(f"a sample holds TextItem and ImageItem, not {type(item).__name__}")
    return out


def _add_vae(b: _Builder, image, item: ImageItem, cfg: BagelConfig, gen: torch.Generator, drop_clean: bool) -> None:
    """A noisy target (no RoPE advance) and/or its clean copy (+1), as the official `_add_image`."""
    pixels = to_tensor(resize(image, cfg.vae_transform))
    h, w = pixels.shape[1] // cfg.latent_downsample, pixels.shape[2] // cfg.latent_downsample
    pos = grid_position_ids(h, w, cfg.max_latent_size)
    o = b.out
    if item.loss:
        b.image(VAE, h * w, NOISE)
        o.vae_images.append(pixels)
        o.latent_position_ids.append(pos)
        o.timesteps_raw.append(torch.randn((), generator=gen).expand(h * w))  # logit-normal, one draw per image
    if item.vae:
        if not drop_clean:
            b.image(VAE, h * w, FULL)
            o.vae_images.append(pixels)
            o.latent_position_ids.append(pos)
            o.timesteps_raw.append(torch.full((h * w,), float("-inf")))
        b.rope += 1


def _add_vit(b: _Builder, image, cfg: BagelConfig) -> None:
    pixels = to_tensor(resize(image, cfg.vit_transform))
    p = cfg.vit.patch_size
    h, w = pixels.shape[1] // p, pixels.shape[2] // p
    b.image(VIT, h * w, FULL)
    b.out.vit_patches.append(patchify_image(pixels, p))
    b.out.vit_position_ids.append(grid_position_ids(h, w, cfg.vit_max_num_patch_per_side))
    b.rope += 1


# ----- masks --------------------------------------------------------------------------------------


def attention_mask(doc: torch.Tensor, split: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """Dense bool mask [L, L] (True = query row may attend key column) of one packed row.

    doc [L]: sample number of each token (-1 for padding); split [L]: split number, unique in the row;
    mode [L]: CAUSAL / FULL / NOISE of the token's split. Allowed iff same sample and (key not after
    query, or same non-causal split), and never into a noise split other than the query's own.
    Padding queries see only themselves, so no softmax row is empty.

    Samples and splits are contiguous, so each query's keys are one range [sample start, end) where
    end is the query itself (causal) or its split's end, minus the keys of other noise splits; ranges
    compare far faster than pairwise sample/split ids.
    """
    L = doc.shape[0]
    idx = torch.arange(L)
    pad = doc < 0

    def run_start(ids: torch.Tensor) -> torch.Tensor:  # first index of each token's run of equal ids
        new = torch.ones(L, dtype=torch.bool)
        new[1:] = ids[1:] != ids[:-1]
        return torch.cummax(torch.where(new, idx, 0), 0).values

    doc_start, split_start = run_start(doc), run_start(split)
    split_end = L - run_start(split.flip(0)).flip(0)  # one past each token's split
    hi = torch.where(mode == CAUSAL, idx + 1, split_end)
    lo = torch.where(pad, idx, doc_start)
    hi = torch.where(pad, idx + 1, hi)
    j = idx[None, :]
    own_split = (j >= split_start[:, None]) & (j < split_end[:, None])
    return (j >= lo[:, None]) & (j < hi[:, None]) & (~(mode == NOISE)[None, :] | own_split)


# ----- collate ------------------------------------------------------------------------------------


def collate(rows: list[list[SampleTokens]], cfg: PackingConfig) -> PackedBatch:
    """Pad rows of tokenized samples to one length and build every tensor of the `PackedBatch`."""
    lengths = [sum(s.num_tokens for s in row) for row in rows]
    if cfg.pad_to_max:
        L = cfg.max_num_tokens
    else:
        L = -(-max(lengths) // cfg.pad_to_multiple) * cfg.pad_to_multiple
    B = len(rows)
    kind = torch.full((B, L), PAD, dtype=torch.long)
    text_ids = torch.zeros(B, L, dtype=torch.long)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    doc = torch.full((B, L), -1, dtype=torch.long)
    split = torch.arange(L).repeat(B, 1) + 1_000_000  # padding: each token its own split
    mode = torch.full((B, L), CAUSAL, dtype=torch.long)
    samples = [s for row in rows for s in row]  # row-major order = the order image tokens are filled
    for r, row in enumerate(rows):
        start, first_split = 0, 0
        for d, s in enumerate(row):
            sl = slice(start, start + s.num_tokens)
            kind[r, sl] = torch.tensor(s.kind)
            text_ids[r, sl] = torch.tensor(s.text_ids)
            position_ids[r, sl] = torch.tensor(s.position_ids)
            labels[r, sl] = torch.tensor(s.labels)
            doc[r, sl] = d
            split[r, sl] = torch.tensor(s.split) + first_split
            mode[r, sl] = torch.tensor(s.mode)
            start += s.num_tokens
            first_split += max(s.split, default=-1) + 1
    mask = torch.stack([attention_mask(doc[r], split[r], mode[r]) for r in range(B)])[:, None]

    def cat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts) if parts else empty

    vit = [t for s in samples for t in s.vit_patches]
    p = vit[0].shape[1] if vit else 0
    timesteps = cat([t for s in samples for t in s.timesteps_raw], torch.zeros(0))
    return PackedBatch(
        token_kind=kind,
        text_ids=text_ids,
        position_ids=position_ids,
        attn_mask=mask,
        labels=labels,
        ce_weights=(labels != IGNORE).float(),
        vit_patches=cat(vit, torch.zeros(0, p)),
        vit_position_ids=cat([t for s in samples for t in s.vit_position_ids], torch.zeros(0, dtype=torch.long)),
        vit_seqlens=[t.shape[0] for t in vit],
        vae_images=[t for s in samples for t in s.vae_images],
        latent_position_ids=cat([t for s in samples for t in s.latent_position_ids], torch.zeros(0, dtype=torch.long)),
        timesteps_raw=timesteps,
        mse_mask=torch.isfinite(timesteps),
        num_samples=len(samples),
        sample_ids=[s.index for s in samples],
    )


# ----- packer -------------------------------------------------------------------------------------


def lanes_mismatch(found: int) -> ValueError:
    """A data position saved with another number of packing worker lanes (`data/workers.py`)."""
    return ValueError(f"the checkpoint's data position has {found} worker lanes (0: no data_workers); "
                      f"resume with data_workers={found}")


class Packer:
    """Pulls samples from a source, packs them into rows under the token budget, and yields batches.

    Rank r of a world of W takes samples r, r+W, r+2W, ... The data position (`state()`) is the next
    sample index and the indices waiting in the overflow buffer; `load_state` rebuilds both by
    re-reading those samples (their randomness is a function of the index, so they come back equal).
    """

    def __init__(self, source: Source, tokenizer: BagelTokenizer, model_cfg: BagelConfig, cfg: PackingConfig,
                 seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.source, self.tokenizer, self.model_cfg, self.cfg = source, tokenizer, model_cfg, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.buffer: list[SampleTokens] = []
        self.next_index = rank
        self._stream: Iterator[tuple[int, Sample]] | None = None
        self.skipped = 0  # samples longer than max_num_tokens_per_sample

    def state(self) -> dict:
        return {"next_index": self.next_index, "buffer": [s.index for s in self.buffer]}

    def load_state(self, state: dict) -> None:
        if "lanes" in state:
            raise lanes_mismatch(len(state["lanes"]))
        wanted = list(state["buffer"])
        self.buffer = []
        if wanted:
            for index, sample in self.source(min(wanted), self.world_size):
                if index in wanted:
                    self.buffer.append(self._tokenize(sample, index))
                if index >= max(wanted):
                    break
            self.buffer.sort(key=lambda s: wanted.index(s.index))
        self.next_index = state["next_index"]
        self._stream = None

    def _tokenize(self, sample: Sample, index: int) -> SampleTokens:
        return tokenize(sample, index, self.tokenizer, self.model_cfg, self.cfg, self.seed)

    def _next_sample(self) -> SampleTokens:
        if self._stream is None:
            self._stream = iter(self.source(self.next_index, self.world_size))
        while True:
            try:
                index, sample = next(self._stream)
            except StopIteration:
                raise RuntimeError("the data source is exhausted (sources should repeat over epochs)") from None
            self.next_index = index + self.world_size
            tokens = self._tokenize(sample, index)
            if tokens.num_tokens <= self.cfg.max_num_tokens_per_sample:
                return tokens
            self.skipped += 1

    def _row(self) -> list[SampleTokens]:
        cfg, row, n = self.cfg, [], 0
        while n < cfg.expected_num_tokens:
            fits = next((s for s in self.buffer if n + s.num_tokens <= cfg.max_num_tokens), None)
            if fits is not None:
                self.buffer.remove(fits)
            else:
                s = self._next_sample()
                if n + s.num_tokens > cfg.max_num_tokens:
                    self.buffer.append(s)
                    if len(self.buffer) > cfg.max_buffer:
                        break
                    continue
                fits = s
            row.append(fits)
            n += fits.num_tokens
        return row

    def next_batch(self) -> PackedBatch:
        cfg, rows, total = self.cfg, [], 0
        while True:
            row = self._row()
            rows.append(row)
            total += sum(s.num_tokens for s in row)
            if (cfg.batch_tokens is None and len(rows) >= cfg.rows_per_batch) or (
                    cfg.batch_tokens is not None and total >= cfg.batch_tokens):
                return collate(rows, cfg)

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            yield self.next_batch()
