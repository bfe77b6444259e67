"""`WorkerPacker`: a `Packer` run in background processes, for accelerators that outpace one CPU core.

Rendering, tokenising and packing a Shapes batch costs about 5 ms per row on one core; an H100 steps
the embedded model through a 32-row batch faster than one core packs it. With `workers=W`, rank r runs
W packing *lanes*, lane w a `Packer` over the samples of global lane g = r*W + w (samples g, g + world*W,
...), each in its own worker process.
Batches come back lane by lane in a fixed order, so a run is deterministic for a given W. The data
position is every lane's `Packer.state()` plus the lane due next: a resumed run continues exactly
where it stopped. (The stream differs from the one of `workers=0`, which is one lane.)

A batch crosses the process boundary with its VAE images in one tensor: each tensor travels through its
own shared-memory file, and ~180 small images cost the receiving process ~0.18 s a batch, longer than
the GPU step they feed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import BagelConfig
from ..tokenizer import BagelTokenizer
from .batch import PackedBatch, flatten_images, unflatten_images
from .packing import Packer, PackingConfig, lanes_mismatch
from .sources import DataConfig, build_source


Wire = tuple[PackedBatch, torch.Tensor, list[tuple[int, ...]], dict]


def _to_wire(batch: PackedBatch, state: dict) -> Wire:
    """The batch without its VAE image list, the images flattened into one tensor, their shapes, the state."""
    return (dataclasses.replace(batch, vae_images=[]), *flatten_images(batch.vae_images), state)


def _from_wire(wire: Wire) -> tuple[PackedBatch, dict]:
    batch, flat, shapes, state = wire
    batch.vae_images = unflatten_images(flat, shapes)
    return batch, state


class _Lanes(IterableDataset):
    """Worker i serves lane (first + i) % W and yields each batch with that lane's state after it."""

    def __init__(self, data: DataConfig, seed: int, tokenizer: BagelTokenizer, model_cfg: BagelConfig,
                 packing: PackingConfig, rank: int, world_size: int, lanes: int, states: list[dict | None],
                 first: int) -> None:
        self.args = (data, seed, tokenizer, model_cfg, packing)
        self.rank, self.world_size, self.lanes, self.states, self.first = rank, world_size, lanes, states, first

    def __iter__(self) -> Iterator[Wire]:
        info = get_worker_info()
        lane = (self.first + (info.id if info else 0)) % self.lanes
        data, seed, tokenizer, model_cfg, packing = self.args
        packer = Packer(build_source(data, seed), tokenizer, model_cfg, packing, seed,
                        rank=self.rank * self.lanes + lane, world_size=self.world_size * self.lanes)
        if self.states[lane] is not None:
            packer.load_state(self.states[lane])
        while True:
            batch = packer.next_batch()
            yield _to_wire(batch, packer.state())


class WorkerPacker:
    """Same interface as `Packer` (`next_batch`, `state`, `load_state`), packing in `workers` processes."""

    def __init__(self, data: DataConfig, tokenizer: BagelTokenizer, model_cfg: BagelConfig, cfg: PackingConfig,
                 seed: int, rank: int = 0, world_size: int = 1, workers: int = 2, prefetch: int = 4) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.args = (data, seed, tokenizer, model_cfg, cfg)
        self.rank, self.world_size, self.workers, self.prefetch = rank, world_size, workers, prefetch
        self.states: list[dict | None] = [None] * workers
        self.next_lane = 0
        self._batches: Iterator[Wire] | None = None

    def state(self) -> dict:
        return {"lanes": list(self.states), "next_lane": self.next_lane}

    def load_state(self, state: dict) -> None:
        found = len(state.get("lanes", []))
        if found != self.workers:
            raise lanes_mismatch(found)
        self.states, self.next_lane = list(state["lanes"]), state["next_lane"]
        self._batches = None

    def next_batch(self) -> PackedBatch:
        if self._batches is None:
            lanes = _Lanes(*self.args, rank=self.rank, world_size=self.world_size, lanes=self.workers,
                           states=self.states, first=self.next_lane)
            loader = DataLoader(lanes, batch_size=None, num_workers=self.workers, prefetch_factor=self.prefetch,
                                persistent_workers=True)
            self._batches = iter(loader)
        batch, lane_state = _from_wire(next(self._batches))
        self.states[self.next_lane] = lane_state
        self.next_lane = (self.next_lane + 1) % self.workers
        return batch

    def __iter__(self) -> Iterator[PackedBatch]:
        return (self.next_batch() for _ in itertools.count())
