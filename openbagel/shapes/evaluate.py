"""Scoring and the eval driver (spec section 4): exact-match accuracy per category, edit preservation
PSNR, thought correctness and multi-turn accuracy, with no judge model.

`evaluate` generates a fresh test set from the evaluation seed stream (tasks.TRAIN_SEED_LIMIT + seed,
never used for training), writes batch task files, lets a runner answer them (`runner(tasks_jsonl,
out_dir)` must write `out_dir/results.jsonl`), then scores. `oracle_runner` answers perfectly.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .detect import detect
from .render import render
from .scene import CELLS, Scene, cell_block
from .taskfile import read_jsonl, write_task_file
from .tasks import GENERATORS, PARTIAL_KINDS, TRAIN_SEED_LIMIT, Constraint, Task, make_task
from .text import parse_caption, think

Runner = Callable[[Path, Path], None]
PSNR_CAP = 100.0  # dB reported for a perfect copy (infinite PSNR), so means stay finite
DEFAULT_THINK_MODES: dict[str, tuple[bool, ...]] = {
    "generate": (False,), "edit": (False,), "reason_edit": (False, True),
    "question": (False,), "reason_question": (False, True), "chat": (False,),
}
_MEAN_NAME = {"generate": "partial_mean"}  # generate's mean covers the six partial kinds only


# --- runners -------------------------------------------------------------------------------------

def _inner(thought: str) -> str:
    return thought.removeprefix("<think>").removesuffix("</think>")


def oracle_runner(tasks_jsonl: Path, out_dir: Path) -> None:
    """A perfect model: reads expected.jsonl beside the task file and answers with it."""
    expected = {e["id"]: e for e in read_jsonl(Path(tasks_jsonl).parent / "expected.jsonl")}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w") as f:
        for line in read_jsonl(tasks_jsonl):
            e = expected[line["id"]]
            result: dict = {"id": line["id"]}
            images = []
            for k, scene in enumerate(e["scenes"]):
                images.append(f"{line['id']}-{k}.png")
                render(Scene.from_dict(scene)).save(out_dir / images[-1])
            if line["task"] == "chat":
                result["images"] = images
            elif images:
                result["image"] = images[0]
            if e["answer"] is not None:
                result["text"] = e["answer"]
            if line.get("think") and line["task"] != "chat":
                result["thought"] = _inner(e["thoughts"][0])
            f.write(json.dumps(result) + "\n")


def pipeline_runner(pipeline) -> Runner:
    """A runner around a loaded inference pipeline, through the batch path."""
    from openbagel.inference.batch import run_batch_file  # lazy: scoring must not need the model stack

    return lambda tasks_jsonl, out_dir: run_batch_file(pipeline, tasks_jsonl, out_dir)


def model_runner(model: str | None = None, quantize: str | None = None) -> Runner:
    """A runner for a model path (None: the embedded default model), optionally quantised while loading."""
    from openbagel.inference.pipeline import BagelPipeline  # lazy, as above

    return pipeline_runner(BagelPipeline.from_pretrained(model, quantize=quantize))


# --- scoring one task ----------------------------------------------------------------------------

@dataclass
class Outcome:
    correct: list[bool]  # one per output (per turn for chat)
    thought_ok: bool | None = None  # None when not thinking
    psnr: float | None = None  # edits only, when some cell must stay untouched


def _load(out_dir: Path, rel: str | None) -> Image.Image | None:
    try:
        return Image.open(out_dir / rel).convert("RGB") if rel else None
    except (OSError, ValueError):
        return None


def _detect(image: Image.Image | None) -> Scene | None:
    try:
        return detect(image) if image is not None else None
    except ValueError:  # wrong size
        return None


def preservation_psnr(source: Scene, expected: Scene, output: Image.Image) -> float | None:
    """PSNR between the source image and the output over the cells the edit must not touch (None if none)."""
    if source.background != expected.background:
        return None
    keep = [c for c in CELLS if source.at(c) == expected.at(c)]
    if not keep or output.size != (64, 64):
        return None
    src, out = np.asarray(render(source), np.float64), np.asarray(output, np.float64)
    mse = np.mean(np.concatenate([(src[cell_block(c)] - out[cell_block(c)]).ravel() ** 2 for c in keep]))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255**2 / mse))


def score_one(e: dict, result: dict | None, out_dir: Path) -> Outcome:
    scenes = [Scene.from_dict(s) for s in e["scenes"]]
    n_out = len(scenes) or 1
    if result is None or "error" in result:
        return Outcome([False] * n_out, False if e["think"] else None)
    thought = result.get("thought")
    thought_ok = None
    if e["think"] and e["kind"] != "chat":
        thought_ok = thought is not None and think(_inner(thought.strip())) == e["thoughts"][0]
    if e["kind"] in ("question", "reason_question"):
        return Outcome([str(result.get("text", "")).strip() == e["answer"]], thought_ok)
    if e["kind"] == "chat":
        paths = result.get("images") or []
        detected = [_detect(_load(out_dir, p)) for p in paths] + [None] * (len(scenes) - len(paths))
        return Outcome([d == s for d, s in zip(detected, scenes)])
    image = _load(out_dir, result.get("image"))
    detected = _detect(image)
    if e["kind"] == "generate":
        check = Constraint.from_dict(e["constraint"]) if e["constraint"] else None
        correct = detected is not None and (check(detected) if check else detected == scenes[0])
        if e["think"]:
            planned = _planned(thought)
            if check:  # any plan satisfying the prompt is a right thought
                thought_ok = planned is not None and check(planned)
            correct = correct and detected == planned
        return Outcome([correct], thought_ok)
    psnr = preservation_psnr(Scene.from_dict(e["source"]), scenes[0], image) if image else None
    return Outcome([detected == scenes[0]], thought_ok, psnr)


def _planned(thought: str | None) -> Scene | None:
    """The scene a text-to-image thought (`so: {caption}`) plans, if it is well formed."""
    if not thought or not (inner := _inner(thought.strip())).startswith("so: "):
        return None
    try:
        return parse_caption(inner.removeprefix("so: "))
    except ValueError:
        return None


# --- aggregation ---------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score(tasks_dir: Path, out_dir: Path) -> dict[str, dict[str, float]]:
    """Score `out_dir/results.jsonl` against `tasks_dir/expected.jsonl`: {"metrics": ..., "counts": ...}."""
    results = {r["id"]: r for r in read_jsonl(Path(out_dir) / "results.jsonl")}
    acc, psnr, thoughts, turns = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
    for e in read_jsonl(Path(tasks_dir) / "expected.jsonl"):
        outcome = score_one(e, results.get(e["id"]), Path(out_dir))
        group = e["kind"] + ("+think" if e["think"] else "")
        acc[(group, e["sub"])].append(float(all(outcome.correct)))
        if outcome.psnr is not None:
            psnr[group].append(outcome.psnr)
        if outcome.thought_ok is not None:
            thoughts[e["kind"]].append(float(outcome.thought_ok))
        if e["kind"] == "chat":
            for k, ok in enumerate(outcome.correct, 1):
                turns[f"{group}/turn{k}"].append(float(ok))
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}

    def put(name: str, values: list[float]) -> None:
        metrics[name], counts[name] = _mean(values), len(values)

    for group in sorted({g for g, _ in acc}, key=lambda g: (list(GENERATORS).index(g.split("+")[0]), g)):
        kind = group.split("+")[0]
        subs = [s for s in GENERATORS[kind] if (group, s) in acc]
        for sub in subs:
            put(f"{group}/{sub}", acc[(group, sub)])
        mean_subs = [s for s in subs if s in PARTIAL_KINDS] if kind == "generate" else subs
        if kind == "chat":
            put(f"{group}/all_turns", [v for s in subs for v in acc[(group, s)]])
            for name in sorted(n for n in turns if n.startswith(group + "/")):
                put(name, turns[name])
        elif mean_subs:
            metrics[f"{group}/{_MEAN_NAME.get(kind, 'mean')}"] = _mean([metrics[f"{group}/{s}"] for s in mean_subs])
        if psnr[group]:
            put(f"{group}/psnr_db", psnr[group])
    for kind, values in thoughts.items():
        put(f"thought/{kind}", values)
    return {"metrics": metrics, "counts": counts}


def format_table(report: Mapping) -> str:
    lines = [f"{'category':<40} {'score':>8} {'n':>6}"]
    for name, value in report["metrics"].items():
        shown = f"{value:8.2f}" if name.endswith("psnr_db") else f"{100 * value:7.1f}%"
        lines.append(f"{name:<40} {shown} {report['counts'].get(name, ''):>6}")
    return "\n".join(lines)


# --- the driver ----------------------------------------------------------------------------------

def eval_tasks(n: int, seed: int, think_modes: Mapping[str, Sequence[bool]]) -> tuple[list[Task], list[bool]]:
    """n tasks per (kind, sub-kind), from the evaluation seed stream, each asked once per think mode.

    Every think mode gets the same tasks, so "with thinking" and "without" compare on the same prompts.
    Each (kind, sub-kind) draws from its own stream: changing one generator leaves the others' tasks as
    they were.
    """
    tasks, thinks = [], []
    for kind, modes in think_modes.items():
        for sub in GENERATORS[kind]:
            rng = random.Random(f"{TRAIN_SEED_LIMIT + seed}:{kind}:{sub}")
            drawn = [make_task(rng, kind, sub) for _ in range(n)]
            for mode in modes:
                tasks += drawn
                thinks += [mode] * n
    return tasks, thinks


def evaluate(runner: Runner, n: int = 20, seed: int = 0,
             think_modes: Mapping[str, Sequence[bool]] = DEFAULT_THINK_MODES,
             out_json: str | Path | None = None, work_dir: str | Path | None = None,
             about: Mapping[str, Any] | None = None) -> dict:
    """Generate, run, score; prints the table and writes the report JSON to out_json if given.

    `about` (what was scored: model, quantisation) is copied into the report, so a JSON says what it measures.
    """
    with tempfile.TemporaryDirectory(prefix="shapes-eval-") as tmp:
        work = Path(work_dir or tmp)
        tasks, thinks = eval_tasks(n, seed, think_modes)
        tasks_jsonl = write_task_file(tasks, work / "tasks", thinks)
        runner(tasks_jsonl, work / "out")
        report = {"n": n, "seed": seed, **(about or {}), **score(work / "tasks", work / "out")}
    print(format_table(report))
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report
