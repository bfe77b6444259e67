"""Batch task files (spec section 5): `tasks.jsonl` for the model, `expected.jsonl` for the scorer.

Input images are written as PNGs under `images/`, referenced relative to the task file's folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .render import render
from .tasks import Task

BATCH_TASK = {"generate": "generate", "edit": "edit", "reason_edit": "edit", "question": "understand",
              "reason_question": "understand", "chat": "chat"}
# The pipeline task whose settings (task_defaults) a kind runs under: a chat is edits in turn.
SETTINGS_TASK = {kind: "edit" if task == "chat" else task for kind, task in BATCH_TASK.items()}


def task_line(task: Task, task_id: str, image: str | None, think: bool, seed: int) -> dict:
    """One line of tasks.jsonl."""
    line: dict = {"id": task_id, "task": BATCH_TASK[task.kind]}
    match line["task"]:
        case "generate":
            line["prompt"] = task.text
        case "edit":
            line |= {"image": image, "instruction": task.text}
        case "understand":
            line |= {"image": image, "question": task.text}
        case "chat":
            line |= {"image": image, "turns": [s.text for s in task.steps]}
    return line | {"think": think, "seed": seed}


def expected_line(task: Task, task_id: str, think: bool) -> dict:
    """One line of expected.jsonl: everything the scorer (and the oracle) needs."""
    return {
        "id": task_id, "kind": task.kind, "sub": task.sub, "think": think,
        "source": task.source.to_dict() if task.source else None,
        "scenes": [s.scene.to_dict() for s in task.steps if s.scene is not None],
        "answer": task.answer,
        "thoughts": [s.thought for s in task.steps],
        "constraint": task.check.to_dict() if task.check else None,
    }


def write_task_file(tasks: Sequence[Task], out_dir: str | Path, think: bool | Sequence[bool] = False) -> Path:
    """Write tasks.jsonl, expected.jsonl and images/ under out_dir; returns the tasks.jsonl path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    thinks = [think] * len(tasks) if isinstance(think, bool) else list(think)
    with open(out / "tasks.jsonl", "w") as tf, open(out / "expected.jsonl", "w") as ef:
        for i, (task, th) in enumerate(zip(tasks, thinks, strict=True)):
            task_id = f"{i:05d}-{task.kind}-{task.sub.replace(' ', '_')}" + ("-think" if th else "")
            image = None
            if task.source is not None:
                image = f"images/{task_id}.png"
                render(task.source).save(out / image)
            tf.write(json.dumps(task_line(task, task_id, image, th, seed=i)) + "\n")
            ef.write(json.dumps(expected_line(task, task_id, th)) + "\n")
    return out / "tasks.jsonl"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
