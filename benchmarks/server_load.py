"""Load on the OpenAI-compatible server: concurrent clients, latency percentiles, memory before and after.

Usage: python benchmarks/server_load.py [--clients 8] [--requests 200] [--model DIR] [--out benchmarks/server_load.json]
Starts `openbagel serve` on 127.0.0.1 (a tiny random checkpoint unless --model is given), warms it up
with one request of each kind, then sends the request mix of tests/test_server_load.py (generation,
text chat, chat about an image, image edit; tiny settings) and records p50/p99 latency, statuses and
the server's RSS. The load driver and server launcher are the test suite's, so the benchmark measures
exactly what CI checks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the suite's launcher and load driver

from test_server import start_server, stop  # noqa: E402
from test_server_load import AUTH, rss_mb, run_load  # noqa: E402


def tiny_checkpoint(directory: Path) -> Path:
    from openbagel.checkpoint import random_checkpoint
    from openbagel.config import preset
    from openbagel.tokenizer import train_tokenizer

    texts = ["a red circle at the top left on a white background", "make the square blue",
             "what color is the triangle?", "think about the layout, then draw."] * 10
    tokenizer = train_tokenizer(texts, vocab_size=300, extra_special_tokens=("<think>", "</think>"))
    return random_checkpoint(directory / "tiny-random", preset("tiny"), tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "server_load.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else tiny_checkpoint(Path(tmp))
        proc, url = start_server(model, Path(tmp) / "sessions.sqlite3", "--queue-size", str(args.queue_size))
        try:
            rss_start = rss_mb(proc.pid)
            warm = run_load(url, clients=1, requests=4, headers=AUTH)
            rss_before = rss_mb(proc.pid)
            stats = run_load(url, clients=args.clients, requests=args.requests, headers=AUTH)
            rss_after = rss_mb(proc.pid)
        finally:
            stop(proc)
    result = {"model": "tiny random" if args.model is None else str(args.model), "queue_size": args.queue_size,
              **stats, "warmup_ok": warm["ok"], "rss_mb_at_start": round(rss_start, 1),
              "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(rss_after, 1),
              "machine": f"{platform.machine()}, {platform.system()}; shared and loaded (timings are indicative)",
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
