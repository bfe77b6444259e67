"""Seeded task generators for every task kind of the spec, each with its expected results.

A Task is a source scene (or none) and one Step per model turn: the text given to the model, the
canonical thought, and the expected scene or answer. Single-step kinds have one step, `chat` has 2-5.
Generators take a `random.Random` and build tasks directly (or retry when a random scene does not fit),
so the same seed always gives the same tasks.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .edits import EDIT_OPS, Edit, plan
from .scene import BACKGROUNDS, CELLS, COLORS, CORNERS, SHAPES, SIZES, Obj, Scene, cell_at
from .text import (NUMBER_WORDS, a, caption, cell_ref, count_sentence, desc, group_sentence, located, refs,
                   think)

# Seed convention: training data comes from integer seeds in [0, TRAIN_SEED_LIMIT); evaluation seeds its
# generators with strings that start with TRAIN_SEED_LIMIT + seed, streams no training seed reaches
# (samples.sample_stream refuses larger integer seeds).
TRAIN_SEED_LIMIT = 2**31

RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = {"to the right of": (0, 1), "to the left of": (0, -1), "above": (-1, 0), "below": (1, 0)}


@dataclass(frozen=True)
class Step:
    """One model turn: its text, canonical thought, and expected scene (images) or answer (text)."""

    text: str
    thought: str
    scene: Scene | None = None
    answer: str | None = None


@dataclass(frozen=True)
class Constraint:
    """GenEval-like rule of a partial prompt: exactly the named objects, with an optional relation
    between the first and the second; every attribute not named is free."""

    wanted: tuple[tuple[str, str | None], ...]  # (shape, colour or None) per named object
    relation: str | None = None

    def __call__(self, scene: Scene) -> bool:
        if len(scene.objects) != len(self.wanted):
            return False
        return any(
            all(o.shape == s and c in (None, o.color) for o, (s, c) in zip(perm, self.wanted))
            and (self.relation is None or _related(perm[0], perm[1], self.relation))
            for perm in itertools.permutations(scene.objects)
        )

    def to_dict(self) -> dict:
        return {"wanted": [list(w) for w in self.wanted], "relation": self.relation}

    @classmethod
    def from_dict(cls, data: dict) -> Constraint:
        return cls(tuple((s, c) for s, c in data["wanted"]), data["relation"])


def _related(x: Obj, y: Obj, relation: str) -> bool:
    (xr, xc), (yr, yc) = x.rc, y.rc
    return {"left of": xc < yc, "right of": xc > yc, "above": xr < yr, "below": xr > yr}[relation]


@dataclass(frozen=True)
class Task:
    kind: str  # generate | edit | reason_edit | question | reason_question | chat
    sub: str
    source: Scene | None
    steps: tuple[Step, ...]
    check: Constraint | None = None  # partial text-to-image prompts only

    @property
    def text(self) -> str:
        return self.steps[0].text

    @property
    def thought(self) -> str:
        return self.steps[0].thought

    @property
    def expected(self) -> Scene | None:
        return self.steps[-1].scene

    @property
    def answer(self) -> str | None:
        return self.steps[-1].answer


# --- random scenes ------------------------------------------------------------------------------

def random_obj(rng: random.Random, cell: str, **fixed: str) -> Obj:
    attrs = {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": rng.choice(list(SIZES))}
    return Obj(cell=cell, **{**attrs, **fixed})


def random_scene(rng: random.Random, n: int | None = None) -> Scene:
    """A source scene: 1-4 objects (or n) in distinct random cells, random attributes and background."""
    n = rng.randint(1, 4) if n is None else n
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(random_obj(rng, c) for c in rng.sample(CELLS, n)))


def neighbour(scene: Scene, obj: Obj, direction: str) -> Obj | None:
    """The nearest object from `obj` in `direction` along its row or column (spec 3.4)."""
    dr, dc = DIRECTIONS[direction]
    r, c = obj.rc
    while 0 <= r + dr <= 2 and 0 <= c + dc <= 2:
        r, c = r + dr, c + dc
        if found := scene.at(cell_at(r, c)):
            return found
    return None


def _other(rng: random.Random, values, old: str) -> str:
    return rng.choice([v for v in values if v != old])


# --- text-to-image (3.2, thoughts 3.7) ------------------------------------------------------------

def _t2i(sub: str, text: str, scene: Scene, check: Constraint | None = None) -> Task:
    return Task("generate", sub, None, (Step(text, think("so: " + caption(scene)), scene=scene),), check)


def _scene_with(rng: random.Random, specs: list[dict], cells: list[str] | None = None) -> Scene:
    cells = cells or rng.sample(CELLS, len(specs))
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(random_obj(rng, c, **s) for c, s in zip(cells, specs)))


def gen_full(rng: random.Random) -> Task:
    scene = random_scene(rng)
    return _t2i("full", caption(scene), scene)


def gen_single(rng: random.Random) -> Task:
    s = rng.choice(SHAPES)
    return _t2i("single", a(s), _scene_with(rng, [{"shape": s}]), Constraint(((s, None),)))


def gen_color(rng: random.Random) -> Task:
    s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
    return _t2i("color", a(f"{c} {s}"), _scene_with(rng, [{"shape": s, "color": c}]), Constraint(((s, c),)))


def gen_two(rng: random.Random) -> Task:
    s1, s2 = rng.sample(SHAPES, 2)
    scene = _scene_with(rng, [{"shape": s1}, {"shape": s2}])
    return _t2i("two", f"{a(s1)} and {a(s2)}", scene, Constraint(((s1, None), (s2, None))))


def gen_attribution(rng: random.Random) -> Task:
    (s1, s2), c1, c2 = rng.sample(SHAPES, 2), rng.choice(list(COLORS)), rng.choice(list(COLORS))  # colours may match
    scene = _scene_with(rng, [{"shape": s1, "color": c1}, {"shape": s2, "color": c2}])
    return _t2i("attribution", f"{a(f'{c1} {s1}')} and {a(f'{c2} {s2}')}", scene, Constraint(((s1, c1), (s2, c2))))


def gen_counting(rng: random.Random) -> Task:
    n, s, c = rng.randint(2, 4), rng.choice(SHAPES), rng.choice(list(COLORS))
    scene = _scene_with(rng, [{"shape": s, "color": c}] * n)
    return _t2i("counting", f"{NUMBER_WORDS[n]} {c} {s}s", scene, Constraint(((s, c),) * n))


def gen_position(rng: random.Random) -> Task:
    (s1, c1), (s2, c2) = rng.sample([(s, c) for s in SHAPES for c in COLORS], 2)
    relation = rng.choice(RELATIONS)
    pairs = [(x, y) for x in CELLS for y in CELLS
             if x != y and _related(Obj(s1, c1, "small", x), Obj(s2, c2, "small", y), relation)]
    scene = _scene_with(rng, [{"shape": s1, "color": c1}, {"shape": s2, "color": c2}], list(rng.choice(pairs)))
    text = f"{a(f'{c1} {s1}')} {relation} {a(f'{c2} {s2}')}"
    return _t2i("position", text, scene, Constraint(((s1, c1), (s2, c2)), relation))


# --- one-step edits (3.3) and chats (3.6) --------------------------------------------------------

def random_edit(rng: random.Random, scene: Scene, op: str) -> Edit | None:
    """A random valid edit of kind `op` on `scene`, or None when the scene allows none."""
    objs = scene.objects
    if op == "add":
        empty = scene.empty_cells()
        return Edit("add", random_obj(rng, rng.choice(empty))) if empty else None
    if op == "background":
        return Edit("background", value=_other(rng, BACKGROUNDS, scene.background))
    if not objs:
        return None
    t = rng.choice(objs)
    match op:
        case "recolor":
            return Edit("recolor", t, _other(rng, COLORS, t.color))
        case "remove":
            return Edit("remove", t)
        case "move":
            empty = scene.empty_cells()
            return Edit("move", t, rng.choice(empty)) if empty else None
        case "resize":
            return Edit("resize", t, "bigger" if t.size == "small" else "smaller")
        case "reshape":
            return Edit("reshape", t, _other(rng, SHAPES, t.shape))
        case "swap":
            pairs = [(x, y) for x, y in itertools.permutations(objs, 2) if Edit("swap", x, other=y).is_valid(scene)]
            if not pairs:
                return None
            x, y = rng.choice(pairs)
            return Edit("swap", x, other=y)
    raise ValueError(f"unknown edit op {op!r}")


def edit_step(rng: random.Random, scene: Scene, edit: Edit) -> Step:
    """The step of a one-step edit: instruction with refs unique before the edit, thought `so: {plan}`."""
    ref = rng.choice(refs(scene, edit.target)) if edit.target and edit.op != "add" else None
    other_ref = rng.choice(refs(scene, edit.other)) if edit.other else None
    return Step(edit.instruction(ref, other_ref), think("so: " + edit.instruction()), scene=edit.apply(scene))


def _edit_gen(op: str) -> Callable[[random.Random], Task | None]:
    def gen(rng: random.Random) -> Task | None:
        source = random_scene(rng)
        edit = random_edit(rng, source, op)
        return Task("edit", op, source, (edit_step(rng, source, edit),)) if edit else None
    gen.__name__ = f"gen_{op}"
    return gen


def _chat_gen(turns: int) -> Callable[[random.Random], Task]:
    def gen(rng: random.Random) -> Task:
        source = scene = random_scene(rng)
        steps = []
        for _ in range(turns):
            edits = [e for e in (random_edit(rng, scene, op) for op in rng.sample(EDIT_OPS, len(EDIT_OPS))) if e]
            step = edit_step(rng, scene, edits[0])  # "background" is always possible
            steps.append(step)
            scene = step.scene
        return Task("chat", f"{turns} turns", source, tuple(steps))
    gen.__name__ = f"gen_chat_{turns}"
    return gen


# --- reasoning edits (3.4) -----------------------------------------------------------------------

def _reason_edit(sub: str, source: Scene, text: str, facts: str, edits: list[Edit]) -> Task:
    expected = source
    for e in edits:
        expected = e.apply(expected)
    return Task("reason_edit", sub, source, (Step(text, think(f"{facts}. so: {plan(edits)}"), scene=expected),))


def gen_size_match(rng: random.Random) -> Task:
    c_large, c_small = rng.sample(list(COLORS), 2)
    return size_match_task(_scene_with(rng, [{"size": "large", "color": c_large}, {"size": "small", "color": c_small}]))


def size_match_task(source: Scene) -> Task:
    """The largest/smallest edit on a scene of one large and one small object (the spec's worked example)."""
    large, small = sorted(source.objects, key=lambda o: o.size == "small")
    return _reason_edit("size_match", source, "make the large shape the same color as the small shape",
                        f"the large shape is {desc(large)}. the small shape is {desc(small)}",
                        [Edit("recolor", large, small.color)])


def gen_same_color(rng: random.Random) -> Task:
    scene = random_scene(rng, rng.randint(2, 4))
    ref_obj, *rest = rng.sample(scene.objects, len(scene.objects))
    c = ref_obj.color
    recolored = [o.with_(color=c) for o in rng.sample(rest, rng.randint(1, len(rest)))]
    source = Scene(scene.background, tuple(o for o in scene.objects if o.cell not in {r.cell for r in recolored})
                   + tuple(recolored))
    others = [o for o in source.objects if o.color == c and o != ref_obj]
    return _reason_edit("same_color", source, f"remove every shape that has the same color as {rng.choice(refs(source, ref_obj))}",
                        f"{cell_ref(ref_obj)} is {c}. {group_sentence(f'other {c} shape', others)}",
                        [Edit("remove", o) for o in others])


def _opposite(cell: str) -> str:
    r, c = divmod(CELLS.index(cell), 3)
    return cell_at(2 - r, 2 - c)


def gen_opposite_corner(rng: random.Random) -> Task | None:
    source = random_scene(rng)
    movable = [o for o in source.objects if o.cell in CORNERS and source.at(_opposite(o.cell)) is None]
    if not movable:
        return None
    o = rng.choice(movable)
    return _reason_edit("opposite_corner", source, f"move {rng.choice(refs(source, o))} to the opposite corner",
                        f"{located(o)}. the opposite corner is the {_opposite(o.cell)}",
                        [Edit("move", o, _opposite(o.cell))])


def _neighbour_pair(rng: random.Random, scene: Scene) -> tuple[Obj, str, Obj] | None:
    pairs = [(o, d, n) for o in scene.objects for d in DIRECTIONS if (n := neighbour(scene, o, d))]
    return rng.choice(pairs) if pairs else None


def gen_neighbour(rng: random.Random) -> Task | None:
    source = random_scene(rng, rng.randint(2, 4))
    if not (found := _neighbour_pair(rng, source)):
        return None
    o, direction, n = found
    color = _other(rng, COLORS, n.color)
    return _reason_edit("neighbour", source, f"make the shape {direction} {rng.choice(refs(source, o))} {color}",
                        f"the shape {direction} {cell_ref(o)} is {desc(n)}", [Edit("recolor", n, color)])


def _count(scene: Scene, shape: str) -> int:
    return sum(o.shape == shape for o in scene.objects)


def gen_counting_rule(rng: random.Random) -> Task | None:
    source = random_scene(rng, rng.randint(2, 4))
    present = sorted({o.shape for o in source.objects}, key=SHAPES.index)
    if len(present) < 2:
        return None
    sa, sb = rng.sample(present, 2)
    x, y = rng.sample([sa, sb], 2)
    if _count(source, sa) == _count(source, sb) and rng.random() < 0.5:
        return None  # random scenes tie in ~60% of cases: keep half, so the `otherwise` branch is no safe guess
    removed = x if _count(source, sa) > _count(source, sb) else y
    return _reason_edit("counting_rule", source,
                        f"if there are more {sa}s than {sb}s remove the {x}s, otherwise remove the {y}s",
                        f"{count_sentence(_count(source, sa), sa)}. {count_sentence(_count(source, sb), sb)}",
                        [Edit("remove", o) for o in source.objects if o.shape == removed])


def odd_one(scene: Scene, attr: str) -> Obj | None:
    """The one object whose `attr` differs while all others share theirs (needs 3+ objects)."""
    values = [getattr(o, attr) for o in scene.objects]
    odd = [o for o, v in zip(scene.objects, values) if values.count(v) == 1]
    return odd[0] if len(values) >= 3 and len(odd) == 1 and len(set(values)) == 2 else None


def gen_odd_one_out(rng: random.Random) -> Task | None:
    attr = rng.choice(("color", "shape"))
    common, odd_value = rng.sample(list(COLORS) if attr == "color" else SHAPES, 2)
    n = rng.randint(3, 4)
    source = _scene_with(rng, [{attr: common}] * (n - 1) + [{attr: odd_value}])
    odd = odd_one(source, attr)
    if odd_one(source, "shape" if attr == "color" else "color"):  # never both readings at once
        return None
    shared = common if attr == "color" else common + "s"
    return _reason_edit("odd_one_out", source, "remove the shape that does not belong",
                        f"all shapes are {shared} except {desc(odd)}", [Edit("remove", odd)])


def gen_copy_color(rng: random.Random) -> Task | None:
    source = random_scene(rng, rng.randint(2, 4))
    o = rng.choice(source.objects)
    targets = [t for t in source.objects if t.color != o.color]
    if not targets:
        return None
    return _reason_edit("copy_color", source, f"paint every shape the color of {rng.choice(refs(source, o))}",
                        f"{cell_ref(o)} is {o.color}", [Edit("recolor", t, o.color) for t in targets])


# --- questions (3.5) -----------------------------------------------------------------------------

def _question(kind: str, sub: str, source: Scene, text: str, facts: str, answer: str) -> Task:
    return Task(kind, sub, source, (Step(text, think(facts), answer=answer),))


def _ref(rng: random.Random, scene: Scene, obj: Obj, answer: str) -> str | None:
    """A ref to obj that does not contain the question's own answer (None if every form does)."""
    forms = refs(scene, obj, avoid=answer)
    return rng.choice(forms) if forms else None


def q_color(rng: random.Random) -> Task:
    source = random_scene(rng)
    o = rng.choice(source.objects)
    return _question("question", "color", source, f"what color is {_ref(rng, source, o, o.color)}?",
                     f"{cell_ref(o)} is {o.color}", o.color)


def q_shape_at(rng: random.Random) -> Task:
    source = random_scene(rng)
    cell = rng.choice(source.objects).cell if rng.random() < 0.7 else rng.choice(CELLS)
    o = source.at(cell)
    facts = located(o) if o else f"there is nothing at the {cell}"
    return _question("question", "shape_at", source, f"what shape is at the {cell}?", facts, o.shape if o else "nothing")


def q_count(rng: random.Random) -> Task:
    source = random_scene(rng)
    return _question("question", "count", source, "how many shapes are there?",
                     group_sentence("shape", list(source.objects)), str(len(source.objects)))


def q_count_color(rng: random.Random) -> Task:
    source = random_scene(rng)
    c = rng.choice(source.objects).color if rng.random() < 0.7 else rng.choice(list(COLORS))
    found = [o for o in source.objects if o.color == c]
    return _question("question", "count_color", source, f"how many {c} shapes are there?",
                     group_sentence(f"{c} shape", found), str(len(found)))


def q_count_shape(rng: random.Random) -> Task:
    source = random_scene(rng)
    s = rng.choice(source.objects).shape if rng.random() < 0.7 else rng.choice(SHAPES)
    found = [o for o in source.objects if o.shape == s]
    return _question("question", "count_shape", source, f"how many {s}s are there?",
                     group_sentence(s, found), str(len(found)))


def q_exists(rng: random.Random) -> Task:
    source = random_scene(rng)
    if rng.random() < 0.5:
        o = rng.choice(source.objects)
        c, s = o.color, o.shape
    else:
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
    found = [o for o in source.objects if (o.color, o.shape) == (c, s)]
    return _question("question", "exists", source, f"is there {a(f'{c} {s}')}?",
                     group_sentence(f"{c} {s}", found), "yes" if found else "no")


def q_where(rng: random.Random) -> Task | None:
    source = random_scene(rng)
    o = rng.choice(source.objects)
    if not (ref := _ref(rng, source, o, o.cell)):
        return None
    return _question("question", "where", source, f"where is {ref}?", located(o), o.cell)


def q_background(rng: random.Random) -> Task:
    source = random_scene(rng)
    return _question("question", "background", source, "what color is the background?",
                     f"the background is {source.background}", source.background)


def q_describe(rng: random.Random) -> Task:
    source = random_scene(rng)
    return _question("question", "describe", source, "describe the image.",
                     f"{group_sentence('shape', list(source.objects))}. the background is {source.background}",
                     caption(source))


# --- reasoning questions (3.5) -------------------------------------------------------------------

def rq_neighbour_color(rng: random.Random) -> Task | None:
    source = random_scene(rng, rng.randint(2, 4))
    if not (found := _neighbour_pair(rng, source)):
        return None
    o, direction, n = found
    return _question("reason_question", "neighbour_color", source,
                     f"what color is the shape {direction} {_ref(rng, source, o, n.color)}?",
                     f"the shape {direction} {cell_ref(o)} is {desc(n)}", n.color)


def rq_bigger_count(rng: random.Random) -> Task | None:
    source = random_scene(rng)
    o = rng.choice(source.objects)
    if o.size == "large":
        facts, answer = f"{cell_ref(o)} is large. no shape is bigger", 0
    else:
        larges = [x for x in source.objects if x.size == "large"]
        facts, answer = f"{cell_ref(o)} is small. {group_sentence('large shape', larges)}", len(larges)
    if answer == 0 and rng.random() < 2 / 3:
        return None  # random scenes answer 0 in ~75% of cases: keep a third of those, about half of all
    return _question("reason_question", "bigger_count", source,
                     f"how many shapes are bigger than {_ref(rng, source, o, str(answer))}?", facts, str(answer))


def rq_more(rng: random.Random) -> Task:
    source = random_scene(rng)
    if rng.random() < 0.25:
        sa, sb = rng.sample(SHAPES, 2)  # any two shapes, both possibly absent
    else:
        sa = rng.choice(sorted({o.shape for o in source.objects}, key=SHAPES.index))
        sb = _other(rng, SHAPES, sa)
        if rng.random() < 0.5:
            sa, sb = sb, sa
    na, nb = _count(source, sa), _count(source, sb)
    return _question("reason_question", "more", source, f"are there more {sa}s than {sb}s?",
                     f"{count_sentence(na, sa)}. {count_sentence(nb, sb)}", "yes" if na > nb else "no")


def rq_same_color(rng: random.Random) -> Task | None:
    scene = random_scene(rng, rng.randint(2, 4))
    o, partner = rng.sample(scene.objects, 2)
    source = scene.replacing(partner, partner.with_(color=o.color))
    partner = partner.with_(color=o.color)
    if sum(x.color == o.color for x in source.objects) != 2:
        return None
    answer = cell_ref(partner)
    if not (ref := _ref(rng, source, o, answer)):  # e.g. "the square at the top left" contains "the square at the top"
        return None
    return _question("reason_question", "same_color", source, f"which shape has the same color as {ref}?",
                     f"{cell_ref(o)} is {o.color}. {group_sentence(f'other {o.color} shape', [partner])}", answer)


# --- registry ------------------------------------------------------------------------------------

Generator = Callable[[random.Random], "Task | None"]

GENERATORS: dict[str, dict[str, Generator]] = {
    "generate": {"full": gen_full, "single": gen_single, "color": gen_color, "two": gen_two,
                 "attribution": gen_attribution, "counting": gen_counting, "position": gen_position},
    "edit": {op: _edit_gen(op) for op in EDIT_OPS},
    "reason_edit": {"size_match": gen_size_match, "same_color": gen_same_color,
                    "opposite_corner": gen_opposite_corner, "neighbour": gen_neighbour,
                    "counting_rule": gen_counting_rule, "odd_one_out": gen_odd_one_out, "copy_color": gen_copy_color},
    "question": {"color": q_color, "shape_at": q_shape_at, "count": q_count, "count_color": q_count_color,
                 "count_shape": q_count_shape, "exists": q_exists, "where": q_where, "background": q_background,
                 "describe": q_describe},
    "reason_question": {"neighbour_color": rq_neighbour_color, "bigger_count": rq_bigger_count, "more": rq_more,
                        "same_color": rq_same_color},
    "chat": {f"{n} turns": _chat_gen(n) for n in range(2, 6)},
}
KINDS = tuple(GENERATORS)
PARTIAL_KINDS = ("single", "color", "two", "attribution", "counting", "position")


def make_task(rng: random.Random, kind: str, sub: str | None = None) -> Task:
    """One task of `kind` (and `sub`, else a uniformly random sub-kind); retries scenes that do not fit."""
    if kind not in GENERATORS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    subs = GENERATORS[kind]
    if sub is not None and sub not in subs:
        raise ValueError(f"sub-kind: {sub!r} is not one of {', '.join(subs)}")
    gen = subs[sub or rng.choice(list(subs))]
    while (task := gen(rng)) is None:
        pass
    return task


def parse_kind(spec: str) -> tuple[str, str | None]:
    """`edit` -> ("edit", None); `edit:swap` -> ("edit", "swap"); validated."""
    kind, _, sub = spec.partition(":")
    if kind not in GENERATORS or (sub and sub not in GENERATORS[kind]):
        choices = [k for k in KINDS] + [f"{k}:{s}" for k in KINDS for s in GENERATORS[k]]
        raise ValueError(f"kind: {spec!r} is not one of {', '.join(choices)}")
    return kind, sub or None


def task_stream(rng: random.Random, mix: dict[str, float]) -> Iterator[Task]:
    """Endless tasks, drawing a kind spec (`kind` or `kind:sub`) with the probabilities of `mix`."""
    specs = [parse_kind(k) for k in mix]
    weights = list(mix.values())
    while True:
        kind, sub = rng.choices(specs, weights)[0]
        yield make_task(rng, kind, sub)
