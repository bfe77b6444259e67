"""Training samples, batch task files, the scorer (oracle 100%, failures 0%) and the sample/eval commands."""

import json
import random

import numpy as np
import pytest
from PIL import ImageDraw

from openbagel.data.interleaved import ImageItem, TextItem
from openbagel.shapes.evaluate import DEFAULT_THINK_MODES, evaluate, oracle_runner
from openbagel.shapes.render import render
from openbagel.shapes.samples import GEN_THINK_SYSTEM, UND_THINK_SYSTEM, sample_stream, training_sample
from openbagel.shapes.scene import Scene
from openbagel.shapes.tasks import GENERATORS, TRAIN_SEED_LIMIT, make_task

ALL_THINK = {k: (False, True) for k in GENERATORS}


def layout(sample):
    return [(type(i).__name__[0], i.loss, getattr(i, "vae", None), getattr(i, "vit", None)) for i in sample]


def same_image(item, scene):
    return np.array_equal(np.asarray(item.image), np.asarray(render(scene)))


def test_sample_layouts():
    rng = random.Random(0)
    t2i, edit, q, chat = (make_task(rng, k) for k in ("generate", "edit", "reason_question", "chat"))
    s = training_sample(t2i, think=False, rng=rng)
    assert layout(s) == [("T", False, None, None), ("I", True, False, False)] and same_image(s[1], t2i.expected)
    s = training_sample(t2i, think=True, rng=rng)
    assert s[0].text == GEN_THINK_SYSTEM and s[2] == TextItem(t2i.thought, loss=True)
    s = training_sample(edit, think=False, rng=rng)
    assert layout(s) == [("I", False, True, True), ("T", False, None, None), ("I", True, False, False)]
    assert same_image(s[0], edit.source) and same_image(s[2], edit.expected)
    s = training_sample(edit, think=True, rng=rng)
    assert s[0].text == GEN_THINK_SYSTEM and s[3] == TextItem(edit.thought, loss=True)
    s = training_sample(q, think=False, rng=rng)
    assert layout(s) == [("I", False, False, True), ("T", False, None, None), ("T", True, None, None)]
    assert s[2].text == q.answer
    s = training_sample(q, think=True, rng=rng)
    assert s[0].text == UND_THINK_SYSTEM and s[3].text == f"{q.thought} {q.answer}"
    s = training_sample(chat, think=False, rng=rng)
    turns = len(chat.steps)
    assert layout(s) == [("I", False, True, True)] + [("T", False, None, None), ("I", True, True, True)] * (turns - 1) \
        + [("T", False, None, None), ("I", True, False, False)]
    assert all(same_image(s[2 + 2 * k], step.scene) for k, step in enumerate(chat.steps))


def test_prompts_keep_the_canonical_text_and_often_are_it():
    rng = random.Random(1)
    texts = []
    for _ in range(200):
        task = make_task(rng, "edit")
        text = training_sample(task, think=False, rng=rng)[1].text
        assert task.text in text
        texts.append(text == task.text)
    assert 0.35 < sum(texts) / len(texts) < 0.65


def test_sample_stream_mix_think_and_seed_guard():
    stream = sample_stream(3, {"question": 1.0, "generate:full": 1.0}, think_prob=0.5)
    samples = [next(stream) for _ in range(40)]
    assert all(isinstance(i, (TextItem, ImageItem)) for s in samples for i in s)
    assert {len(s) for s in samples} >= {2, 3, 4}  # generate, question, thinking variants
    with pytest.raises(ValueError, match="training seed"):
        next(sample_stream(TRAIN_SEED_LIMIT, {"edit": 1.0}, 0.0))


def test_oracle_scores_100_everywhere(tmp_path):
    report = evaluate(oracle_runner, n=2, seed=0, think_modes=ALL_THINK, out_json=tmp_path / "r.json")
    metrics = report["metrics"]
    for kind in GENERATORS:
        for group in (kind, kind + "+think"):
            assert all(metrics[f"{group}/{sub}"] == 1.0 for sub in GENERATORS[kind])
    assert all(v == 100.0 if k.endswith("psnr_db") else v == 1.0 for k, v in metrics.items()), metrics
    for name in ("generate/partial_mean", "edit/mean", "edit/psnr_db", "reason_edit+think/mean", "question/mean",
                 "reason_question+think/mean", "chat/all_turns", "chat/turn5", "chat/3 turns", "thought/reason_edit",
                 "thought/generate", "thought/question"):
        assert name in metrics
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == metrics


def test_failing_runners_score_zero(tmp_path):
    def silent(tasks_jsonl, out_dir):
        out_dir.mkdir(parents=True)
        lines = [json.loads(line) for line in open(tasks_jsonl)]
        with open(out_dir / "results.jsonl", "w") as f:
            for line in lines:  # an unreadable image, a wrong answer and a wrong thought for everything
                image = render(Scene("black"))
                ImageDraw.Draw(image).rectangle([23, 23, 41, 26], fill=(30, 90, 230))
                image.save(out_dir / f"{line['id']}.png")
                f.write(json.dumps({"id": line["id"], "image": f"{line['id']}.png",
                                    "images": [f"{line['id']}.png"] * len(line.get("turns", [])),
                                    "text": "purple?", "thought": "no idea"}) + "\n")

    metrics = evaluate(silent, n=2, seed=1, think_modes=DEFAULT_THINK_MODES, work_dir=tmp_path)["metrics"]
    accuracy = {k: v for k, v in metrics.items() if not k.endswith("psnr_db")}
    assert all(v == 0.0 for v in accuracy.values()), accuracy
    assert metrics["edit/psnr_db"] < 30

    def crashing(tasks_jsonl, out_dir):
        out_dir.mkdir(parents=True)
        with open(out_dir / "results.jsonl", "w") as f:
            for line in open(tasks_jsonl):
                f.write(json.dumps({"id": json.loads(line)["id"], "error": "boom"}) + "\n")

    metrics = evaluate(crashing, n=1, seed=1, think_modes=DEFAULT_THINK_MODES)["metrics"]
    assert all(v == 0.0 for v in metrics.values())


def test_eval_uses_seeds_disjoint_from_training(tmp_path):
    from openbagel.shapes.evaluate import eval_tasks
    tasks, _ = eval_tasks(1, 0, {"generate": (False,)})
    rng = random.Random(0)
    assert tasks[0] != make_task(rng, "generate", "full")
    assert eval_tasks(1, 0, {"generate": (False,)})[0] == tasks  # reproducible


def test_cli_sample_writes_batch_and_expected(tmp_path):
    from openbagel.shapes.cli import main
    main(["shapes", "sample", "--kind", "chat", "-n", "3", "--out", str(tmp_path), "--seed", "5", "--think"])
    lines = [json.loads(x) for x in open(tmp_path / "tasks.jsonl")]
    expected = [json.loads(x) for x in open(tmp_path / "expected.jsonl")]
    assert [x["id"] for x in lines] == [x["id"] for x in expected] and len(set(x["id"] for x in lines)) == 3
    for line, e in zip(lines, expected):
        assert line["task"] == "chat" and line["think"] is True and 2 <= len(line["turns"]) <= 5
        assert (tmp_path / line["image"]).is_file() and len(e["scenes"]) == len(line["turns"])
    with pytest.raises(SystemExit, match="kind: 'nope'"):
        main(["shapes", "sample", "--kind", "nope", "-n", "1", "--out", str(tmp_path)])


def test_cli_eval_oracle(tmp_path, capsys):
    from openbagel.shapes.cli import main
    main(["eval", "shapes", "--oracle", "-n", "1", "--out", str(tmp_path / "r.json")])
    assert "edit/mean" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"]["chat/all_turns"] == 1.0 and report["model"] == "oracle"
    with pytest.raises(SystemExit, match="--oracle answers without a model"):
        main(["eval", "shapes", "--oracle", "--quantize", "int4"])
    # a bad mode is the same one-line error as under the `openbagel` entry point, not a traceback
    assert main(["eval", "shapes", "--quantize", "int9", "-n", "1"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown quantisation mode 'int9'")


def test_cli_eval_kinds_scores_only_those_kinds(tmp_path, capsys):
    from openbagel.shapes.cli import main
    main(["eval", "shapes", "--oracle", "-n", "1", "--kinds", "question,chat", "--out", str(tmp_path / "r.json")])
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert metrics["question/mean"] == 1.0 and metrics["chat/all_turns"] == 1.0
    assert not any(name.startswith(("generate/", "edit/", "reason_")) for name in metrics)
    with pytest.raises(SystemExit, match="--kinds: pictures is not a task kind"):
        main(["eval", "shapes", "--oracle", "--kinds", "question,pictures"])


def test_cli_eval_kinds_think_suffix_scores_the_thinking_mode():
    from openbagel.shapes.cli import think_modes_for
    assert think_modes_for("generate+think") == {"generate": (True,)}
    assert think_modes_for("generate,generate+think,edit") == {"generate": (False, True), "edit": (False,)}
    assert think_modes_for(None) == DEFAULT_THINK_MODES
    with pytest.raises(SystemExit, match="--kinds: chat\\+thinking is not a task kind"):
        think_modes_for("chat+thinking")


def test_generate_think_draws_the_same_tasks_as_the_full_set():
    """`--kinds generate+think` is the full set's text-to-image tasks in thinking mode (text-to-image comes first)."""
    from openbagel.shapes.evaluate import eval_tasks
    thinking, modes = eval_tasks(2, 0, {"generate": (True,)})
    full, _ = eval_tasks(2, 0, DEFAULT_THINK_MODES)
    assert all(modes) and thinking == full[:len(thinking)]


def test_think_modes_share_tasks_and_categories_draw_apart():
    """Thinking and plain rows ask the same tasks (a paired comparison), and one category's tasks do not
    depend on which other categories are evaluated."""
    from openbagel.shapes.evaluate import eval_tasks
    tasks, modes = eval_tasks(3, 0, {"reason_edit": (False, True)})
    per_sub = [tasks[i:i + 6] for i in range(0, len(tasks), 6)]
    assert all(group[:3] == group[3:] for group in per_sub) and modes[:6] == [False] * 3 + [True] * 3
    alone, _ = eval_tasks(3, 0, {"question": (False,)})
    mixed, _ = eval_tasks(3, 0, {"edit": (False,), "question": (False,)})
    assert mixed[-len(alone):] == alone and eval_tasks(3, 1, {"question": (False,)})[0] != alone


def test_cli_eval_generate_think_reports_thinking_rows(tmp_path):
    from openbagel.shapes.cli import main
    main(["eval", "shapes", "--oracle", "-n", "1", "--kinds", "generate+think", "--out", str(tmp_path / "r.json")])
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert metrics["generate+think/partial_mean"] == 1.0 and metrics["thought/generate"] == 1.0
    assert not any(name.startswith("generate/") for name in metrics)
