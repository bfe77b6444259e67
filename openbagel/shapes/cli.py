"""Command line: `shapes render`, `shapes sample` and `eval shapes`. The top-level `openbagel` CLI
mounts these with `register(subparsers)`; `python -m openbagel.shapes.cli ...` runs them standalone, with
the same error handling.

Handlers turn bad input into SystemExit("error: ..."): one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from .evaluate import DEFAULT_THINK_MODES, evaluate, model_runner, oracle_runner
from .render import render
from .scene import load_scene
from .taskfile import write_task_file
from .tasks import make_task, parse_kind


def _render(args: argparse.Namespace) -> None:
    try:
        scene = load_scene(args.scene)
    except OSError as e:
        raise SystemExit(f"error: cannot read {args.scene}: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"error: {args.scene}: {e}") from None
    render(scene).save(args.out, format="PNG")
    print(args.out)


def _sample(args: argparse.Namespace) -> None:
    try:
        kind, sub = parse_kind(args.kind)
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from None
    if args.n < 1:
        raise SystemExit("error: -n must be at least 1")
    rng = random.Random(args.seed)
    tasks = [make_task(rng, kind, sub) for _ in range(args.n)]
    path = write_task_file(tasks, args.out, think=args.think)
    print(f"wrote {len(tasks)} tasks to {path} (expected results: {path.parent / 'expected.jsonl'})")


def think_modes_for(kinds: str | None) -> dict[str, tuple[bool, ...]]:
    """`--kinds`: comma-separated kinds, each in its default think modes, or `KIND+think` for thinking only
    (`generate,generate+think` scores text-to-image both ways); None: every kind, default modes."""
    if kinds is None:
        return dict(DEFAULT_THINK_MODES)
    modes: dict[str, tuple[bool, ...]] = {}
    entries = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in entries if k.removesuffix("+think") not in DEFAULT_THINK_MODES]
    if unknown or not entries:
        raise SystemExit(f"error: --kinds: {', '.join(unknown) or 'nothing given'} is not a task kind; "
                         f"choose from {', '.join(DEFAULT_THINK_MODES)}, each optionally with +think")
    for entry in entries:
        kind = entry.removesuffix("+think")
        wanted = (True,) if entry.endswith("+think") else DEFAULT_THINK_MODES[kind]
        modes[kind] = tuple(sorted(set(modes.get(kind, ())) | set(wanted)))
    return modes


def _eval(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise SystemExit("error: -n must be at least 1")
    think_modes = think_modes_for(args.kinds)
    if args.oracle and (args.model or args.quantize):
        raise SystemExit("error: --oracle answers without a model; drop --model / --quantize")
    runner = oracle_runner if args.oracle else model_runner(args.model, quantize=args.quantize)
    about = {"model": "oracle"} if args.oracle else {"model": args.model or "embedded", "quantize": args.quantize}
    evaluate(runner, n=args.n, seed=args.seed, think_modes=think_modes, out_json=args.out, about=about)


def register(subparsers: argparse._SubParsersAction, eval_subparsers: argparse._SubParsersAction | None = None) -> None:
    """Add `shapes {render,sample}` to `subparsers`, and `shapes` under `eval` (created unless given)."""
    shapes = subparsers.add_parser("shapes", help="the Shapes world: render scenes, write task files",
                                   description="The Shapes world (spec: shapes-world.md): render scene files, "
                                               "write batch task files with their expected results.",
                                   epilog="example: openbagel shapes sample --kind question -n 5 --out tasks/")
    sub = shapes.add_subparsers(dest="shapes_command", required=True)

    p = sub.add_parser("render", help="render a scene JSON file to a 64x64 PNG",
                       description="Render a scene file (spec section 2) to a pixel-exact 64x64 RGB PNG.",
                       epilog="example: openbagel shapes render scene.json scene.png")
    p.add_argument("scene", help="scene JSON file")
    p.add_argument("out", help="output PNG path")
    p.set_defaults(func=_render)

    p = sub.add_parser("sample", help="write a batch task file with expected results",
                       description="Generate N tasks of one kind and write DIR/tasks.jsonl (batch format), "
                                   "DIR/images/ and DIR/expected.jsonl.",
                       epilog="example: openbagel shapes sample --kind edit:swap -n 10 --out tasks/ --seed 1")
    p.add_argument("--kind", required=True,
                   help="generate, edit, reason_edit, question, reason_question or chat, optionally :SUB "
                        "(e.g. generate:position, edit:swap, chat:3 turns)")
    p.add_argument("-n", type=int, default=10, help="number of tasks (default 10)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--think", action="store_true", help="ask the model to think before answering or drawing")
    p.set_defaults(func=_sample)

    if eval_subparsers is None:
        eval_subparsers = subparsers.add_parser(
            "eval", help="score a model", description="Score a model on a benchmark (shapes: the Shapes world).",
            epilog="example: openbagel eval shapes -n 20 --out shapes_eval.json").add_subparsers(
            dest="eval_command", required=True)
    p = eval_subparsers.add_parser(
        "shapes", help="score a model on a fresh Shapes test set",
        description="Generate a fresh held-out Shapes test set (N tasks per category), run the model through "
                    "the batch path, score every category and print a table.",
        epilog="example: openbagel eval shapes -n 20 --out shapes_eval.json  (add --oracle to check the scorer)")
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="score the model quantised while loading (e.g. int8, int4): what quantising costs")
    p.add_argument("-n", type=int, default=20, help="tasks per category and think mode (default 20)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    p.add_argument("--kinds", default=None,
                   help="comma-separated task kinds to score (default: all; e.g. question,reason_question); "
                        "KIND+think scores that kind in thinking mode only (e.g. generate+think). "
                        "A subset draws a different task stream than the full set for the same seed")
    p.add_argument("--out", default=None, help="write the report as JSON to this file")
    p.add_argument("--oracle", action="store_true", help="answer with the expected results (scores 100%%)")
    p.set_defaults(func=_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openbagel")
    register(parser.add_subparsers(dest="command", required=True))
    from ..cli import run  # the same error handling as the `openbagel` entry point

    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
