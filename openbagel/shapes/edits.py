"""The eight one-step edits of spec section 3.3: their instruction text, their effect and their validity."""

from __future__ import annotations

from dataclasses import dataclass

from .scene import CELLS, Obj, Scene
from .text import a, cell_ref, object_phrase, place_phrase

EDIT_OPS = ("recolor", "remove", "add", "move", "resize", "reshape", "background", "swap")


@dataclass(frozen=True)
class Edit:
    """One edit. `target` is the object acted on (the new object for `add`, None for `background`);
    `value` is the new colour / cell / shape / background, or `bigger` / `smaller`; `other` is swap's partner."""

    op: str
    target: Obj | None = None
    value: str | None = None
    other: Obj | None = None

    @property
    def cell(self) -> str | None:
        """The cell the edit acts on, for row-major ordering of plans."""
        return self.target.cell if self.target else None

    def instruction(self, ref: str | None = None, other_ref: str | None = None) -> str:
        """The instruction text; refs default to the `the {shape} at the {cell}` form of plans."""
        ref = ref or (cell_ref(self.target) if self.target else None)
        match self.op:
            case "recolor":
                return f"make {ref} {self.value}"
            case "remove":
                return f"remove {ref}"
            case "add":
                return f"add {a(object_phrase(self.target))} {place_phrase(self.target.cell)}"
            case "move":
                return f"move {ref} to the {self.value}"
            case "resize":
                return f"make {ref} {self.value}"
            case "reshape":
                return f"turn {ref} into {a(self.value)}"
            case "background":
                return f"make the background {self.value}"
            case "swap":
                return f"swap {ref} and {other_ref or cell_ref(self.other)}"
        raise ValueError(f"unknown edit op {self.op!r}")

    def is_valid(self, scene: Scene) -> bool:
        """True when the edit applies to `scene` and changes it (the spec never asks no-op edits)."""
        t = self.target
        if self.op == "add":
            return scene.at(t.cell) is None
        if self.op == "background":
            return self.value != scene.background
        if t not in scene.objects:
            return False
        match self.op:
            case "recolor":
                return self.value != t.color
            case "remove":
                return True
            case "move":
                return self.value in CELLS and scene.at(self.value) is None
            case "resize":
                return (self.value, t.size) in {("bigger", "small"), ("smaller", "large")}
            case "reshape":
                return self.value != t.shape
            case "swap":
                o = self.other
                return o in scene.objects and o != t and (o.shape, o.color, o.size) != (t.shape, t.color, t.size)
        return False

    def apply(self, scene: Scene) -> Scene:
        t = self.target
        match self.op:
            case "recolor":
                return scene.replacing(t, t.with_(color=self.value))
            case "remove":
                return scene.replacing(t, None)
            case "add":
                return Scene(scene.background, scene.objects + (t,))
            case "move":
                return scene.replacing(t, t.with_(cell=self.value))
            case "resize":
                return scene.replacing(t, t.with_(size="large" if self.value == "bigger" else "small"))
            case "reshape":
                return scene.replacing(t, t.with_(shape=self.value))
            case "background":
                return Scene(self.value, scene.objects)
            case "swap":
                o = self.other
                rest = tuple(x for x in scene.objects if x not in (t, o))
                return Scene(scene.background, rest + (t.with_(cell=o.cell), o.with_(cell=t.cell)))
        raise ValueError(f"unknown edit op {self.op!r}")


def apply_all(scene: Scene, edits: list[Edit]) -> Scene:
    for edit in edits:
        scene = edit.apply(scene)
    return scene


def plan(edits: list[Edit]) -> str:
    """A plan: the edits in `the {shape} at the {cell}` form, row-major by the cell acted on, joined by `; `."""
    ordered = sorted(edits, key=lambda e: CELLS.index(e.cell) if e.cell else -1)
    return "; ".join(e.instruction() for e in ordered)
