"""Data sources: the official training formats read from local files, the Shapes world, a synthetic stream.

A source is `source(start, step) -> iterable of (index, Sample)` over an endless index space (file
sources repeat over epochs, each epoch in its own seeded order), so that a data position is a
single integer and resuming can jump straight to it. Every random choice of a sample (which caption,
which edit span) is a function of (seed, index).

Formats (reference section 6.2):
- text-to-image parquet: rows with `image` (encoded bytes) and `captions` (JSON: a dict or list of
  captions, or one string) -> [caption, target image];
- edit parquet: rows with `image_list` (encoded bytes) and `instruction_list` (per step a string or a
  list of candidates) -> [start image (VAE+ViT), instruction, target, ...] for up to two steps;
- LLaVA-style JSONL: `{"image": path or [paths], "conversations": [{"from": "human"|"gpt", "value"}]}`
  with `<image>` placeholders -> human turns as context, gpt turns with loss, images as ViT context.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .interleaved import ImageItem, Sample, TextItem
from .packing import Source

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class DataConfig:
    """Which source a run reads. `kind` picks the builder; the other fields are its arguments."""

    kind: str = "synthetic"  # synthetic | shapes | t2i_parquet | edit_parquet | llava_jsonl
    paths: list[str] = field(default_factory=list)  # parquet files, or one JSONL file
    image_dir: str = ""  # LLaVA: images are relative to this folder
    shapes_mix: dict[str, float] = field(default_factory=lambda: {"generate": 1.0, "question": 1.0})
    think_prob: float | dict[str, float] = 0.0  # one probability, or one per Shapes task kind
    target_copies: int = 1  # Shapes: noisy copies of each target image (each its own timestep)
    image_size: int = 64  # synthetic images

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"data.image_size must be a multiple of 16, at least 16, got {self.image_size}")


def build_source(cfg: DataConfig, seed: int) -> Source:
    match cfg.kind:
        case "synthetic":
            return synthetic_source(seed, cfg.image_size)
        case "shapes":
            return shapes_source(seed, cfg.shapes_mix, cfg.think_prob, cfg.target_copies)
        case "t2i_parquet":
            return ParquetSource(cfg.paths, seed, t2i_sample)
        case "edit_parquet":
            return ParquetSource(cfg.paths, seed, edit_sample)
        case "llava_jsonl":
            if len(cfg.paths) != 1:
                raise ValueError("llava_jsonl reads exactly one JSONL file: set data.paths=['file.jsonl']")
            return LlavaJsonlSource(cfg.paths[0], cfg.image_dir, seed)
        case _:
            raise ValueError(f"unknown data.kind {cfg.kind!r}: synthetic, shapes, t2i_parquet, edit_parquet, llava_jsonl")


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """The seeded shuffle of n items for one epoch (cached: consecutive indices share an epoch)."""
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return tuple(order)


def _strided(it: Iterator[Sample], start: int, step: int) -> Iterator[tuple[int, Sample]]:
    """(index, sample) pairs of an endless iterator, from `start` every `step` (skipping by replay)."""
    return itertools.islice(enumerate(it), start, None, step)


# ----- generated data -----------------------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
PLACES = ("left", "right", "top", "bottom")


def synthetic_image(colour: str, place: str, size: int) -> Image.Image:
    """A white square canvas with one coloured half: the smallest world a model can visibly learn."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    half = size // 2
    box = {"left": (0, 0, half, size), "right": (half, 0, size, size),
           "top": (0, 0, size, half), "bottom": (0, half, size, size)}[place]
    img.paste(COLOURS[colour], box)
    return img


def synthetic_source(seed: int, image_size: int = 64) -> Source:
    """Text-to-image and question samples about one coloured half: instant, no files needed."""

    def sample(index: int) -> Sample:
        rng = _rng(seed, index)
        colour, place = rng.choice(sorted(COLOURS)), rng.choice(PLACES)
        image = synthetic_image(colour, place, image_size)
        if rng.random() < 0.5:
            return [TextItem(f"{colour} {place}"), ImageItem(image, loss=True, vae=False, vit=False)]
        return [ImageItem(image, vae=False, vit=True), TextItem("what colour, where?"),
                TextItem(f"{colour} {place}", loss=True)]

    def source(start: int, step: int) -> Iterator[tuple[int, Sample]]:
        return ((i, sample(i)) for i in itertools.count(start, step))

    return source


def shapes_source(seed: int, mix: dict[str, float], think_prob: float | dict[str, float],
                  target_copies: int = 1) -> Source:
    from ..shapes.samples import sample_stream

    return lambda start, step: _strided(sample_stream(seed, mix, think_prob, target_copies), start, step)


# ----- files --------------------------------------------------------------------------------------


def _image(data: bytes | dict) -> Image.Image:
    if isinstance(data, dict):  # parquet files written by `datasets` store images as {"bytes", "path"}
        data = data["bytes"]
    return Image.open(io.BytesIO(data)).convert("RGB")


def _pick(text: str | list[str] | dict, rng: random.Random) -> str:
    if isinstance(text, str):
        return text
    options = list(text.values()) if isinstance(text, dict) else list(text)
    if not options:
        raise ValueError("an empty caption / instruction list")
    return rng.choice(options)


def t2i_sample(row: dict, rng: random.Random) -> Sample:
    captions = row["captions"]
    if isinstance(captions, str) and captions[:1] in "[{\"":
        captions = json.loads(captions)
    return [TextItem(_pick(captions, rng)), ImageItem(_image(row["image"]), loss=True, vae=False, vit=False)]


def edit_sample(row: dict, rng: random.Random) -> Sample:
    images, instructions = row["image_list"], row["instruction_list"]
    if len(images) < 2 or len(instructions) < len(images) - 1:
        raise ValueError("an edit row needs >= 2 images and one instruction per step")
    start = rng.randrange(len(images) - 1)
    steps = rng.randint(1, min(2, len(images) - 1 - start))
    items: Sample = [ImageItem(_image(images[start]))]
    for k in range(start, start + steps):
        last = k == start + steps - 1
        items.append(TextItem(_pick(instructions[k], rng)))
        items.append(ImageItem(_image(images[k + 1]), loss=True, vae=not last, vit=not last))
    return items


class ParquetSource:
    """Rows of parquet files, row groups shuffled per epoch; `make_sample(row, rng)` builds a Sample."""

    def __init__(self, paths: list[str], seed: int, make_sample: Callable[[dict, random.Random], Sample]) -> None:
        import pyarrow.parquet as pq

        if not paths:
            raise ValueError("a parquet source needs data.paths (one or more .parquet files)")
        self.seed, self.make_sample, self.paths = seed, make_sample, list(paths)
        self.files = [pq.ParquetFile(p) for p in paths]
        self.groups = [(f, g) for f in range(len(self.files)) for g in range(self.files[f].num_row_groups)]
        self.sizes = [self.files[f].metadata.row_group(g).num_rows for f, g in self.groups]
        self.rows_per_epoch = sum(self.sizes)
        if not self.rows_per_epoch:
            raise ValueError(f"no rows in {paths}")
        self._cached: tuple[int, list[dict]] | None = None

    def _locate(self, index: int) -> tuple[int, int]:
        """(row group, row in it) of a global index: epoch order is a seeded shuffle of the row groups."""
        epoch, pos = divmod(index, self.rows_per_epoch)
        for g in _epoch_order(self.seed, epoch, len(self.groups)):
            if pos < self.sizes[g]:
                return g, pos
            pos -= self.sizes[g]
        raise AssertionError("unreachable: pos < rows_per_epoch")

    def _rows(self, g: int) -> list[dict]:
        if self._cached is None or self._cached[0] != g:
            f, group = self.groups[g]
            self._cached = (g, self.files[f].read_row_group(group).to_pylist())
        return self._cached[1]

    def __call__(self, start: int, step: int) -> Iterator[tuple[int, Sample]]:
        for index in itertools.count(start, step):
            g, r = self._locate(index)
            row = self._rows(g)[r]
            try:
                sample = self.make_sample(row, _rng(self.seed, index))
            except KeyError as exc:
                f, _ = self.groups[g]
                raise ValueError(f"{self.paths[f]} has no column {exc}; its columns: {sorted(row)} (see "
                                 "openbagel/data/sources.py for the columns each data.kind reads)") from None
            yield index, sample


class LlavaJsonlSource:
    """LLaVA-style conversations, one JSON object per line, shuffled per epoch."""

    def __init__(self, path: str, image_dir: str, seed: int) -> None:
        self.path, self.image_dir, self.seed = Path(path), Path(image_dir), seed
        self.offsets, pos = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    self.offsets.append(pos)
                pos += len(line)
        if not self.offsets:
            raise ValueError(f"{path} holds no JSON lines")

    def sample(self, record: dict) -> Sample:
        paths = record.get("image") or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        images = iter(paths)
        items: Sample = []
        for turn in record["conversations"]:
            role = turn["from"]
            if role not in ("human", "gpt"):
                raise ValueError(f"unknown conversation role {role!r} (human or gpt)")
            pieces = turn["value"].split(IMAGE_PLACEHOLDER)
            for k, piece in enumerate(pieces):
                if k:
                    try:
                        items.append(ImageItem(Image.open(self.image_dir / next(images)), vae=False, vit=True))
                    except StopIteration:
                        raise ValueError("more <image> placeholders than images in a record") from None
                if piece.strip():
                    items.append(TextItem(piece.strip(), loss=role == "gpt"))
        return items

    def __call__(self, start: int, step: int) -> Iterator[tuple[int, Sample]]:
        n = len(self.offsets)
        with open(self.path, "rb") as f:
            for index in itertools.count(start, step):
                epoch, pos = divmod(index, n)
                f.seek(self.offsets[_epoch_order(self.seed, epoch, n)[pos]])
                yield index, self.sample(json.loads(f.readline()))
