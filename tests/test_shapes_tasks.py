"""Generators: invariants over many seeds for every task kind and sub-kind."""

import random
import re

import pytest

from openbagel.shapes.scene import CELLS, COLORS, SHAPES, Obj, Scene
from openbagel.shapes.tasks import GENERATORS, Constraint, make_task, odd_one
from openbagel.shapes.text import caption, parse_caption, think

SEEDS = range(40)
ALL_SUBS = [(k, s) for k in GENERATORS for s in GENERATORS[k]]
_CELL_ALT = "|".join(sorted(CELLS, key=len, reverse=True))
REF_RE = re.compile(rf"\bthe (?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)})\b(?: at the ({_CELL_ALT})\b)?")


def tasks_of(kind, sub, seeds=SEEDS):
    return [make_task(random.Random(seed), kind, sub) for seed in seeds]


def assert_refs_unique(text: str, scene: Scene) -> None:
    for color, shape, cell in REF_RE.findall(text):
        if re.search(rf"\bthe {shape}s\b", text):  # "remove the circles" names a group, not a ref
            continue
        hits = [o for o in scene.objects if o.shape == shape and color in ("", o.color) and cell in ("", o.cell)]
        assert len(hits) == 1, (text, scene)


def test_same_seed_same_tasks():
    for kind, sub in ALL_SUBS:
        assert tasks_of(kind, sub, [7])[0].steps == tasks_of(kind, sub, [7])[0].steps


@pytest.mark.parametrize("kind, sub", ALL_SUBS)
def test_common_invariants(kind, sub):
    for task in tasks_of(kind, sub):
        assert (task.kind, task.sub) == (kind, sub)
        if kind == "generate":
            assert task.source is None
            assert task.thought == think("so: " + caption(task.expected))
            if sub == "full":
                assert parse_caption(task.text) == task.expected and task.check is None
            else:
                assert task.check(task.expected)
            continue
        assert 1 <= len(task.source.objects) <= 4
        scene = task.source
        for step in task.steps:
            assert step.text == step.text.lower() and "  " not in step.text
            assert_refs_unique(step.text, scene)
            assert step.thought.startswith("<think>") and step.thought.endswith("</think>")
            if kind in ("question", "reason_question"):
                assert step.answer and step.scene is None
            else:
                assert step.scene != scene  # edits that change nothing are never asked
                scene = step.scene
        if kind in ("edit", "chat"):
            assert all(re.fullmatch(r"<think>so: [^;]+</think>", s.thought) for s in task.steps)
        if kind == "reason_edit":
            assert re.fullmatch(r"<think>[^<]+\. so: [^<]+</think>", task.thought)
        if kind == "chat":
            assert len(task.steps) == int(sub.split()[0])


def _diff(a: Scene, b: Scene):
    return [o for o in a.objects if o not in b.objects], [o for o in b.objects if o not in a.objects]


@pytest.mark.parametrize("op", GENERATORS["edit"])
def test_one_step_edits_change_only_what_they_name(op):
    for task in tasks_of("edit", op):
        src, exp = task.source, task.expected
        gone, new = _diff(src, exp)
        if op == "background":
            assert src.background != exp.background and src.objects == exp.objects
            continue
        assert src.background == exp.background
        if op == "remove":
            assert len(gone) == 1 and not new
        elif op == "add":
            assert not gone and len(new) == 1 and src.at(new[0].cell) is None
        elif op == "swap":
            assert len(gone) == len(new) == 2
            x, y = gone
            assert set(new) == {x.with_(cell=y.cell), y.with_(cell=x.cell)}
            assert (x.shape, x.color, x.size) != (y.shape, y.color, y.size)
        else:
            assert len(gone) == len(new) == 1
            changed = {f for f in ("shape", "color", "size", "cell") if getattr(gone[0], f) != getattr(new[0], f)}
            assert changed == {"recolor": {"color"}, "move": {"cell"}, "resize": {"size"}, "reshape": {"shape"}}[op]
            if op == "move":
                assert src.at(new[0].cell) is None
            if op == "resize":
                assert ("bigger" in task.text) == (gone[0].size == "small")


def test_counting_rule_takes_otherwise_on_a_tie():
    seen_tie = False
    for task in tasks_of("reason_edit", "counting_rule", range(150)):
        a, b, x, y = re.fullmatch(r"if there are more (\w+)s than (\w+)s remove the (\w+)s, otherwise remove the (\w+)s",
                                  task.text).groups()
        count = lambda s: sum(o.shape == s for o in task.source.objects)  # noqa: E731
        assert a != b and {x, y} == {a, b} and count(a) and count(b)
        seen_tie |= count(a) == count(b)
        removed = x if count(a) > count(b) else y
        assert task.expected.objects == tuple(o for o in task.source.objects if o.shape != removed)
    assert seen_tie


def test_generators_cover_the_spec_forms_and_balance_the_answers():
    """Forms the spec allows are drawn (a shared colour, shapes the scene lacks), and answers a random scene
    makes common (a tie, zero) stay far from a safe guess."""
    attribution = [t.text.split() for t in tasks_of("generate", "attribution", range(200))]
    assert any(w[1] == w[5] for w in attribution) and any(w[1] != w[5] for w in attribution)
    presence = set()
    for task in tasks_of("reason_question", "more", range(200)):
        a, b = re.fullmatch(r"are there more (\w+)s than (\w+)s\?", task.text).groups()
        shapes = {o.shape for o in task.source.objects}
        presence.add((a in shapes, b in shapes))
        assert task.answer == ("yes" if sum(o.shape == a for o in task.source.objects)
                               > sum(o.shape == b for o in task.source.objects) else "no")
    assert presence == {(True, True), (True, False), (False, True), (False, False)}
    ties = 0
    for task in tasks_of("reason_edit", "counting_rule", range(300)):
        a, b = re.match(r"if there are more (\w+)s than (\w+)s", task.text).groups()
        ties += sum(o.shape == a for o in task.source.objects) == sum(o.shape == b for o in task.source.objects)
    assert 0.2 < ties / 300 < 0.5  # random scenes tie in ~60% of cases
    zeros = sum(t.answer == "0" for t in tasks_of("reason_question", "bigger_count", range(300)))
    assert zeros / 300 < 0.6


def test_reasoning_edit_rules():
    for task in tasks_of("reason_edit", "odd_one_out"):
        assert len(task.source.objects) >= 3
        assert (odd_one(task.source, "color") is None) != (odd_one(task.source, "shape") is None)
    for task in tasks_of("reason_edit", "copy_color"):
        assert len({o.color for o in task.expected.objects}) == 1
    for task in tasks_of("reason_edit", "size_match"):
        large, small = sorted(task.source.objects, key=lambda o: o.size == "small")
        assert (large.size, small.size) == ("large", "small") and large.color != small.color
        assert task.expected == task.source.replacing(large, large.with_(color=small.color))
    for task in tasks_of("reason_edit", "same_color"):
        (gone_color,) = {o.color for o in _diff(task.source, task.expected)[0]}
        assert sum(o.color == gone_color for o in task.expected.objects) == 1


def test_questions_never_use_a_ref_containing_their_answer():
    for kind, sub in [("question", "color"), ("question", "where"), ("reason_question", "neighbour_color")]:
        for task in tasks_of(kind, sub):
            assert f" {task.answer} " not in f" {task.text[:-1]} ", task.text


def test_question_answers():
    for task in tasks_of("question", "count"):
        assert task.answer == str(len(task.source.objects))
    for task in tasks_of("question", "describe"):
        assert task.answer == caption(task.source)
    for task in tasks_of("reason_question", "same_color"):
        assert re.fullmatch(rf"the ({'|'.join(SHAPES)}) at the ({_CELL_ALT})", task.answer)
    answers = {t.answer for t in tasks_of("question", "exists", range(100))}
    assert answers == {"yes", "no"}


def test_partial_constraints_are_exact():
    c = Constraint((("circle", "red"), ("square", None)), "left of")
    red_circle, square = Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "bottom")
    assert c(Scene("white", (red_circle, square)))
    assert not c(Scene("white", (red_circle.with_(cell="right"), square)))  # not left of
    assert not c(Scene("white", (red_circle.with_(color="blue"), square)))  # wrong colour
    assert not c(Scene("white", (red_circle, square, Obj("diamond", "red", "small", "center"))))  # extra object
    assert Constraint((("circle", "red"),) * 2)(Scene("gray", (red_circle, red_circle.with_(cell="center"))))
    assert not Constraint((("circle", "red"),) * 3)(Scene("gray", (red_circle, red_circle.with_(cell="center"))))


@pytest.mark.parametrize("source", ["shipped", "preset"])
def test_decoding_budget_fits_every_canonical_text(source):
    """The embedded model's default cap on generated tokens must fit the longest thought and answer the
    world asks for, in its own vocabulary; a truncated thought or `describe` answer is scored wrong."""
    from openbagel.config import BagelConfig, preset
    from openbagel.inference.pipeline import EMBEDDED_MODEL
    from openbagel.inference.settings import resolve
    from openbagel.shapes.taskfile import SETTINGS_TASK
    from openbagel.tokenizer import BagelTokenizer

    config = BagelConfig.load(EMBEDDED_MODEL) if source == "shipped" else preset("shapes-tiny")
    tokenizer = BagelTokenizer.from_dir(EMBEDDED_MODEL)
    longest: dict[str, int] = {}
    for kind, sub in ALL_SUBS:
        for task in tasks_of(kind, sub, range(60)):
            for step in task.steps:
                # thinking: "<think>...</think>" then the answer, if any; without: the answer alone
                text = step.thought + (f" {step.answer}" if step.answer is not None else "")
                pipeline_task = SETTINGS_TASK[kind]
                longest[pipeline_task] = max(longest.get(pipeline_task, 0), len(tokenizer.encode(text)) + 1)
    for pipeline_task, n in longest.items():
        cap = resolve(pipeline_task, {}, config.task_defaults).text.max_new_tokens
        assert n <= cap, f"{pipeline_task}: {n} tokens needed, default cap {cap}"
