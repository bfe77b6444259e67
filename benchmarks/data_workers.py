"""Feeding a GPU from packing workers: what one batch of the `shapes-tiny-gpu` recipe costs to pack, and
what it costs the training process to receive from a worker, as `WorkerPacker` sends it (VAE images
flattened into one tensor) and as a plain DataLoader sends the same batch (one shared-memory file per
tensor).

Usage: python benchmarks/data_workers.py [--batches 6] [--workers 2]
The workers get a head start so that every timed batch is already packed: the receive time is what the
training loop pays per step on top of the GPU step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, report  # noqa: E402

from openbagel.checkpoint import load_checkpoint  # noqa: E402
from openbagel.data.packing import Packer  # noqa: E402
from openbagel.data.sources import build_source  # noqa: E402
from openbagel.data.workers import WorkerPacker  # noqa: E402
from openbagel.inference.pipeline import EMBEDDED_MODEL  # noqa: E402
from openbagel.train.recipes import get_recipe  # noqa: E402


class PlainBatches(IterableDataset):
    """The recipe's batches as a plain DataLoader worker yields them (every tensor its own file)."""

    def __init__(self, args: tuple) -> None:
        self.args = args

    def __iter__(self):
        data, seed, tokenizer, model_cfg, packing = self.args
        packer = Packer(build_source(data, seed), tokenizer, model_cfg, packing, seed)
        while True:
            yield packer.next_batch()


def receive_seconds(next_batch, batches: int, head_start: float) -> float:
    next_batch()
    time.sleep(head_start)
    start = time.perf_counter()
    for _ in range(batches):
        next_batch()
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--head-start", type=float, default=30.0, help="seconds the workers pack ahead")
    parser.add_argument("--out", default="benchmarks/data_workers.json")
    args = parser.parse_args()
    cfg = get_recipe("shapes-tiny-gpu")
    ckpt = load_checkpoint(EMBEDDED_MODEL)
    packer = Packer(build_source(cfg.data, cfg.seed), ckpt.tokenizer, ckpt.config, cfg.packing, cfg.seed)
    packer.next_batch()
    start = time.perf_counter()
    batch = None
    for _ in range(args.batches):
        batch = packer.next_batch()
    pack = (time.perf_counter() - start) / args.batches

    wire = WorkerPacker(cfg.data, ckpt.tokenizer, ckpt.config, cfg.packing, cfg.seed, workers=args.workers)
    flat = receive_seconds(wire.next_batch, args.batches, args.head_start)
    plain_batches = PlainBatches((cfg.data, cfg.seed, ckpt.tokenizer, ckpt.config, cfg.packing))
    plain = iter(DataLoader(plain_batches, batch_size=None, num_workers=args.workers, prefetch_factor=4,
                            persistent_workers=True))
    separate = receive_seconds(lambda: next(plain), args.batches, args.head_start)

    rows = [{"what": "pack one batch (one process)", "seconds": round(pack, 4)},
            {"what": "receive, images as separate tensors", "seconds": round(separate, 4)},
            {"what": "receive, images flattened (WorkerPacker)", "seconds": round(flat, 4)}]
    report(rows, ["what", "seconds"], args.out,
           {"benchmark": "data_workers", "rows_per_batch": cfg.packing.rows_per_batch,
            "tokens_per_batch": batch.num_tokens, "vae_images_per_batch": len(batch.vae_images),
            "workers": args.workers, **environment(2)})


if __name__ == "__main__":
    main()
