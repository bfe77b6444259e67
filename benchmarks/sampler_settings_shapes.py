"""Sampler and decoding settings on the embedded model, judged by the Shapes world: one score row per setting.

Usage: python benchmarks/sampler_settings_shapes.py --kind generate -n 10 --seed 11 \
           --variant '{}' --variant '{"cfg_text_scale": 6}' --variant '{"max_think_token_n": 400}' [--think]
Each variant is a JSON object of settings (the names of `openbagel.inference.settings`) laid over the
checkpoint's defaults for the pipeline task that serves `--kind` (a Shapes task kind: generate, edit,
reason_edit, question, reason_question, chat); every variant answers the same held-out tasks (same seed).
Choose settings on one seed and confirm them on another: one seed's tasks are too few to both pick and
report a winner.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, report  # noqa: E402

from openbagel.inference.pipeline import BagelPipeline  # noqa: E402
from openbagel.shapes.evaluate import DEFAULT_THINK_MODES, evaluate, pipeline_runner  # noqa: E402
from openbagel.shapes.taskfile import SETTINGS_TASK  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=tuple(DEFAULT_THINK_MODES), required=True)
    parser.add_argument("--variant", action="append", default=None,
                        help="JSON object of settings; repeat for several (default: the checkpoint's own)")
    parser.add_argument("--think", action="store_true", help="ask the model to think first")
    parser.add_argument("-n", type=int, default=10, help="tasks per sub-kind")
    parser.add_argument("--seed", type=int, default=11, help="evaluation seed (the card's tables use 0 and 1)")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = [json.loads(v) for v in (args.variant or ["{}"])]
    task = SETTINGS_TASK[args.kind]
    prefix = f"{args.kind}+think/" if args.think else f"{args.kind}/"
    torch.set_num_threads(args.threads)
    pipe = BagelPipeline.from_pretrained(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    shipped = pipe.config
    rows, columns = [], []
    for variant in variants:
        defaults = copy.deepcopy(shipped.task_defaults)
        defaults.setdefault(task, {}).update(variant)
        pipe.config = dataclasses.replace(shipped, task_defaults=defaults)
        start = time.perf_counter()
        metrics = evaluate(pipeline_runner(pipe), n=args.n, seed=args.seed,
                           think_modes={args.kind: (args.think,)})["metrics"]
        row = {"settings": json.dumps(variant, separators=(",", ":"))}
        for key, value in metrics.items():
            name = key.removeprefix(prefix) if key.startswith(prefix) else key if key.startswith("thought/") else None
            if name is not None:
                row[name] = round(value if name.endswith("psnr_db") else value * 100, 1)
                columns += [name] if name not in columns else []
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    pipe.config = shipped
    report(rows, ["settings", *columns, "seconds"], args.out or f"benchmarks/sampler_settings_{args.kind}.json",
           {"benchmark": "sampler_settings_shapes", "kind": args.kind, "think": args.think, "n": args.n,
            "seed": args.seed, "checkpoint_defaults": shipped.task_defaults.get(task, {}), **environment(args.threads)})


if __name__ == "__main__":
    main()
