"""`openbagel batch TASKS.jsonl --out DIR`: run a file of tasks (Shapes spec, section 5).

Each line is validated on its own; a bad line becomes a result with an `error` and the rest still run.
Tasks of the same kind are packed into one batched pipeline call (up to `max_batch` at a time); if a
batched call fails, its tasks are retried one by one so that only the faulty task reports an error.
Image paths are relative to the task file's folder and may not leave it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..processing import ImageLoadError, open_image
from .pipeline import BagelOutput, BagelPipeline, InputError, Request
from .session import Conversations

KINDS = ("generate", "edit", "understand", "chat")
REQUIRED = {"generate": ("prompt",), "edit": ("image", "instruction"), "understand": ("image", "question"),
            "chat": ("image", "turns")}
MAX_TURNS = 20


@dataclass
class Task:
    index: int
    id: str
    kind: str
    text: str | None = None
    image: Image.Image | None = None
    turns: list[str] = field(default_factory=list)
    think: bool = False
    seed: int = 0
    error: str | None = None


def parse_line(index: int, line: str, base: Path, seen: set[str]) -> Task:
    """One task line -> Task (with `error` set when the line is unusable)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return Task(index, f"line-{index + 1}", "?", error=f"line {index + 1} is not valid JSON: {exc.msg}")
    if not isinstance(data, dict):
        return Task(index, f"line-{index + 1}", "?", error=f"line {index + 1} must be a JSON object")
    task_id = data.get("id")
    if not isinstance(task_id, str) or not task_id:
        problem = "missing field 'id'" if "id" not in data else f"'id' is {task_id!r}"
        return Task(index, f"line-{index + 1}", "?", error=f"{problem}; it must be a non-empty string")
    task = Task(index, task_id, str(data.get("task")))
    try:
        if task_id in seen:
            raise InputError(f"duplicate id {task_id!r}")
        seen.add(task_id)
        if task.kind not in KINDS:
            raise InputError(f"unknown task {data.get('task')!r}; use one of {', '.join(KINDS)}")
        for key in REQUIRED[task.kind]:
            if key not in data:
                raise InputError(f"{task.kind} task needs the field {key!r}")
        think = data.get("think", False)
        if not isinstance(think, bool):
            raise InputError("'think' must be true or false")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError("'seed' must be a non-negative integer")
        task.think, task.seed = think, seed
        text_key = {"generate": "prompt", "edit": "instruction", "understand": "question"}.get(task.kind)
        if text_key:
            if not isinstance(data[text_key], str):
                raise InputError(f"'{text_key}' must be a string")
            task.text = data[text_key]
        if task.kind == "chat":
            turns = data["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise InputError("'turns' must be a non-empty list of instructions")
            if len(turns) > MAX_TURNS:
                raise InputError(f"'turns' holds {len(turns)} instructions; the limit is {MAX_TURNS}")
            task.turns = turns
        if "image" in REQUIRED[task.kind]:
            task.image = open_image(_inside(base, data["image"]), name="image")
    except (InputError, ImageLoadError) as exc:
        task.error = str(exc)
    return task


def _inside(base: Path, relative: Any) -> Path:
    """Resolve a task's image path, refusing absolute paths and paths that escape the task folder."""
    if not isinstance(relative, str) or not relative:
        raise InputError("'image' must be a relative path (a string)")
    path = Path(relative)
    if path.is_absolute():
        raise InputError(f"image path {relative!r} must be relative to the task file's folder")
    resolved = (base / path).resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise InputError(f"image path {relative!r} leaves the task file's folder")
    return resolved


def _file_stem(task: Task) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", task.id)[:60]
    return f"{task.index:05d}_{safe}"


def run_batch_file(pipe: BagelPipeline, tasks_path: str | Path, out_dir: str | Path, *, max_batch: int = 16,
                   settings: dict[str, Any] | None = None) -> list[dict]:
    """Run every task of a JSONL file; write results.jsonl and PNGs into out_dir; return the results."""
    tasks_path, out_dir = Path(tasks_path), Path(out_dir)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")
    try:
        lines = tasks_path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading BOM is not JSON
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read task file {tasks_path}: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    tasks = [parse_line(i, line, tasks_path.parent, seen) for i, line in enumerate(lines) if line.strip()]
    for i, t in enumerate(tasks):
        t.index = i
    results: list[dict] = [{"id": t.id} for t in tasks]
    settings = settings or {}
    for t in tasks:
        if t.error:
            results[t.index]["error"] = t.error
    by_kind: dict[tuple, list[Task]] = {}
    for t in tasks:
        if not t.error:
            key = (t.kind, len(t.turns)) if t.kind == "chat" else (t.kind,)
            by_kind.setdefault(key, []).append(t)
    for key, group in by_kind.items():
        for start in range(0, len(group), max_batch):
            chunk = group[start:start + max_batch]
            _run_chunk(pipe, chunk, results, out_dir, settings)
    with open(out_dir / "results.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    return results


def _run_chunk(pipe, chunk: list[Task], results: list[dict], out_dir: Path, settings: dict) -> None:
    try:
        _run_tasks(pipe, chunk, results, out_dir, settings)
    except Exception as exc:  # isolate the faulty task: rerun one by one
        if len(chunk) == 1:
            results[chunk[0].index]["error"] = _message(exc)
            return
        for task in chunk:
            _run_chunk(pipe, [task], results, out_dir, settings)


def _message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, (InputError, ImageLoadError, ValueError)) else f"{type(exc).__name__}: {exc}"


def _run_tasks(pipe, chunk: list[Task], results: list[dict], out_dir: Path, settings: dict) -> None:
    kind = chunk[0].kind
    if kind == "chat":
        conv = Conversations(pipe, [t.image for t in chunk], think=[t.think for t in chunk],
                             seeds=[t.seed for t in chunk], settings=settings)
        per_turn: list[list[BagelOutput]] = []
        for k in range(len(chunk[0].turns)):
            per_turn.append(conv.turn([t.turns[k] for t in chunk], [t.seed + k for t in chunk]))
        for b, t in enumerate(chunk):
            names = []
            for k, outs in enumerate(per_turn):
                name = f"{_file_stem(t)}_turn{k + 1}.png"
                outs[b].images[0].save(out_dir / name)
                names.append(name)
            res = results[t.index]
            res["images"] = names
            if t.think:
                res["thoughts"] = [outs[b].thought for outs in per_turn]
                res["thought"] = per_turn[-1][b].thought
        return
    requests = [Request(kind, t.text, t.image, t.think, seed=t.seed, settings=dict(settings)) for t in chunk]
    outputs = pipe.run(requests)
    for t, out in zip(chunk, outputs):
        res = results[t.index]
        if out.images:
            name = f"{_file_stem(t)}.png"
            out.images[0].save(out_dir / name)
            res["image"] = name
        if out.text is not None:
            res["text"] = out.text
        if t.think:
            res["thought"] = out.thought
