"""Scenes of the Shapes world (spec sections 1 and 2): the vocabulary, Obj, Scene and scene JSON.

A Scene keeps its objects sorted in row-major cell order and allows one object per cell, so plain
dataclass equality is the spec's equality "as a set" and captions can walk `scene.objects` in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

CANVAS = 64
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (245, 130, 20),
    "yellow": (245, 225, 30),
    "green": (30, 180, 60),
    "blue": (30, 90, 230),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, int] = {"small": 5, "large": 9}  # half-extent r
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CORNERS = ("top left", "top right", "bottom left", "bottom right")


def cell_rc(cell: str) -> tuple[int, int]:
    """(row, col) of a cell name."""
    return divmod(CELLS.index(cell), 3)


def cell_at(row: int, col: int) -> str:
    return CELLS[3 * row + col]


def cell_center(cell: str) -> tuple[int, int]:
    """(x, y) pixel centre of a cell."""
    row, col = cell_rc(cell)
    return 11 + 21 * col, 11 + 21 * row


def cell_block(cell: str) -> tuple[slice, slice]:
    """(rows, cols) index of the 21 x 21 block a cell covers."""
    cx, cy = cell_center(cell)
    return slice(cy - 10, cy + 11), slice(cx - 10, cx + 11)


def _check(field: str, value: Any, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:  # a list or dict is unhashable: test the type first
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True, order=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: str

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, COLORS)
        _check("size", self.size, SIZES)
        _check("cell", self.cell, CELLS)

    @property
    def rc(self) -> tuple[int, int]:
        return cell_rc(self.cell)

    def with_(self, **changes: str) -> Obj:
        return replace(self, **changes)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...] = ()

    def __post_init__(self) -> None:
        _check("background", self.background, BACKGROUNDS)
        objs = tuple(sorted(self.objects, key=lambda o: CELLS.index(o.cell)))
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects: two objects share a cell ({', '.join(c for c in CELLS if cells.count(c) > 1)})")
        object.__setattr__(self, "objects", objs)

    def at(self, cell: str) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def empty_cells(self) -> list[str]:
        taken = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in taken]

    def replacing(self, old: Obj, new: Obj | None) -> Scene:
        """The scene with `old` replaced by `new` (or removed when new is None)."""
        rest = [o for o in self.objects if o != old]
        return Scene(self.background, tuple(rest + ([new] if new else [])))

    def to_dict(self) -> dict:
        return {"background": self.background,
                "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell} for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Any) -> Scene:
        """Parse and validate; errors name the bad field, e.g. `objects[1].color: 'pink' is not one of ...`."""
        if not isinstance(data, dict):
            raise ValueError("scene: expected a JSON object with 'background' and 'objects'")
        if "background" not in data:
            raise ValueError("background: missing")
        objects = data.get("objects", [])
        if not isinstance(objects, list):
            raise ValueError("objects: expected a list")
        objs = []
        for i, o in enumerate(objects):
            if not isinstance(o, dict):
                raise ValueError(f"objects[{i}]: expected an object with shape, color, size, cell")
            for field in ("shape", "color", "size", "cell"):
                if field not in o:
                    raise ValueError(f"objects[{i}].{field}: missing")
            try:
                objs.append(Obj(o["shape"], o["color"], o["size"], o["cell"]))
            except ValueError as e:
                raise ValueError(f"objects[{i}].{e}") from None
        return cls(data["background"], tuple(objs))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Scene:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"scene: not valid JSON ({e})") from None
        return cls.from_dict(data)


def load_scene(path: str | Path) -> Scene:
    return Scene.from_json(Path(path).read_text(encoding="utf-8"))


def save_scene(scene: Scene, path: str | Path) -> None:
    Path(path).write_text(scene.to_json() + "\n", encoding="utf-8")
