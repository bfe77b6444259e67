"""The texts of spec section 3: phrases, captions (and their parser), refs and the sentences of thoughts.

Everything here is a pure function of scenes and objects, so generators, the scorer and tests share
one spelling of every string.
"""

from __future__ import annotations

import re

from .scene import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, Obj, Scene

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def a(phrase: str) -> str:
    """`a {phrase}`, or `an {phrase}` before a vowel (only `orange` in this world)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(obj: Obj) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


def place_phrase(cell: str) -> str:
    return f"at the {cell}"


def join(items: list[str]) -> str:
    """`x`, `x and y`, `x, y and z`."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    if not scene.objects:
        return f"nothing on a {scene.background} background"
    return join([f"{a(object_phrase(o))} {place_phrase(o.cell)}" for o in scene.objects]) + \
        f" on a {scene.background} background"


_OBJECT_RE = re.compile(rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(CELLS)})")


def parse_caption(text: str) -> Scene:
    """Inverse of `caption` (used to read the scene a model planned in its thought); ValueError if malformed."""
    m = re.fullmatch(rf"(.*) on a ({'|'.join(BACKGROUNDS)}) background", text)
    if not m:
        raise ValueError(f"not a caption: {text!r}")
    body, background = m.groups()
    if body == "nothing":
        return Scene(background)
    head, _, last = body.rpartition(" and ")
    parts = (head.split(", ") if head else []) + [last]
    objs = []
    for part in parts:
        om = _OBJECT_RE.fullmatch(part)
        if not om:
            raise ValueError(f"not an object in a caption: {part!r}")
        objs.append(Obj(om[3], om[2], om[1], om[4]))
    scene = Scene(background, tuple(objs))
    if caption(scene) != text:  # row-major order and article spelling are part of the form
        raise ValueError(f"not a canonical caption: {text!r}")
    return scene


# --- referring expressions (3.1) -------------------------------------------------------------------

def cell_ref(obj: Obj) -> str:
    """`the {shape} at the {cell}`: always unique, the form used in plans."""
    return f"the {obj.shape} {place_phrase(obj.cell)}"


def refs(scene: Scene, obj: Obj, avoid: str | None = None) -> list[str]:
    """The ref forms that name `obj` uniquely in `scene`, minus any containing the words `avoid`."""
    forms = []
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        forms.append(f"the {obj.shape}")
    if sum((o.shape, o.color) == (obj.shape, obj.color) for o in scene.objects) == 1:
        forms.append(f"the {obj.color} {obj.shape}")
    forms.append(cell_ref(obj))
    if avoid is not None:
        forms = [f for f in forms if f" {avoid} " not in f" {f} "]
    return forms


# --- sentences of thoughts (3.4, 3.5, 3.7) -------------------------------------------------------

def think(inner: str) -> str:
    return f"<think>{inner}</think>"


def desc(obj: Obj) -> str:
    """How facts name an object: `the {color} {shape} at the {cell}`."""
    return f"the {obj.color} {obj.shape} {place_phrase(obj.cell)}"


def located(obj: Obj) -> str:
    return f"the {obj.color} {obj.shape} is {place_phrase(obj.cell)}"


def count_sentence(n: int, noun: str) -> str:
    """`there are no circles` / `there is 1 circle` / `there are 3 circles`."""
    if n == 0:
        return f"there are no {noun}s"
    return f"there is 1 {noun}" if n == 1 else f"there are {n} {noun}s"


def group_sentence(noun: str, objs: list[Obj]) -> str:
    """Lists the objects of a group: `there are no red shapes` / `the only red shape is ...` / `the red shapes are ...`."""
    if not objs:
        return f"there are no {noun}s"
    if len(objs) == 1:
        return f"the only {noun} is {desc(objs[0])}"
    return f"the {noun}s are {join([desc(o) for o in objs])}"
