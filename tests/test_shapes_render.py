"""Renderer: every shape, size, colour and cell against hand-computed pixel sets; scene files."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from openbagel.shapes.render import render
from openbagel.shapes.scene import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, Obj, Scene, load_scene, save_scene

# Pillow's filled ellipses (no anti-aliasing), written out row by row.
CIRCLES = {
    5: """...#####...
..#######..
.#########.
###########
###########
###########
###########
###########
.#########.
..#######..
...#####...""",
    9: """.......#####.......
.....#########.....
...#############...
..###############..
..###############..
.#################.
.#################.
###################
###################
###################
###################
###################
.#################.
.#################.
..###############..
..###############..
...#############...
.....#########.....
.......#####.......""",
}


def expected_mask(shape: str, r: int, cx: int, cy: int) -> np.ndarray:
    """The pixels the spec's primitive covers, computed from the shape's geometry."""
    ys, xs = np.mgrid[0:64, 0:64]
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        return (abs(dx) <= r) & (abs(dy) <= r)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if shape == "triangle":  # apex (cx, cy-r), base from (cx-r, cy+r) to (cx+r, cy+r)
        return (dy >= -r) & (dy <= r) & (2 * abs(dx) <= dy + r)
    mask = np.zeros((64, 64), bool)
    art = np.array([[c == "#" for c in row] for row in CIRCLES[r].splitlines()])
    mask[cy - r:cy + r + 1, cx - r:cx + r + 1] = art
    return mask


def test_cell_centres_follow_the_spec():
    from openbagel.shapes.scene import cell_center
    assert cell_center("top left") == (11, 11)
    assert cell_center("right") == (53, 32)
    assert cell_center("bottom") == (32, 53)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_every_object_is_pixel_exact(shape, size):
    r = SIZES[size]
    for i, cell in enumerate(CELLS):
        row, col = divmod(i, 3)
        cx, cy = 11 + 21 * col, 11 + 21 * row
        want = expected_mask(shape, r, cx, cy)
        for j, color in enumerate(COLORS):
            background = list(BACKGROUNDS)[(i + j) % 3]
            pixels = np.asarray(render(Scene(background, (Obj(shape, color, size, cell),))))
            assert (pixels[want] == COLORS[color]).all(), (shape, size, color, cell)
            assert (pixels[~want] == BACKGROUNDS[background]).all(), (shape, size, color, cell)


def test_pixel_counts_by_hand():
    counts = {(s, z): int(expected_mask(s, SIZES[z], 32, 32).sum()) for s in SHAPES for z in SIZES}
    assert counts == {("circle", "small"): 97, ("circle", "large"): 277, ("square", "small"): 121,
                      ("square", "large"): 361, ("triangle", "small"): 61, ("triangle", "large"): 181,
                      ("diamond", "small"): 61, ("diamond", "large"): 181}


def test_full_scene_and_empty_scene():
    objs = tuple(Obj(SHAPES[i % 4], list(COLORS)[i % 6], list(SIZES)[i % 2], c) for i, c in enumerate(CELLS))
    pixels = np.asarray(render(Scene("gray", objs)))
    union = np.zeros((64, 64), bool)
    for o in objs:
        cx, cy = 11 + 21 * o.rc[1], 11 + 21 * o.rc[0]
        m = expected_mask(o.shape, SIZES[o.size], cx, cy)
        assert (pixels[m] == COLORS[o.color]).all()
        union |= m
    assert (pixels[~union] == (128, 128, 128)).all()
    empty = render(Scene("white"))
    assert empty.mode == "RGB" and empty.size == (64, 64)
    assert (np.asarray(empty) == 255).all()


def test_scene_equality_is_a_set_and_json_round_trips(tmp_path):
    a, b = Obj("circle", "red", "large", "top left"), Obj("square", "blue", "small", "center")
    assert Scene("black", (a, b)) == Scene("black", (b, a))
    assert Scene("black", (a, b)) != Scene("white", (a, b))
    assert Scene("black", (a,)) != Scene("black", (a, b))
    save_scene(Scene("black", (b, a)), tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data == {"background": "black", "objects": [
        {"shape": "circle", "color": "red", "size": "large", "cell": "top left"},
        {"shape": "square", "color": "blue", "size": "small", "cell": "center"}]}
    assert load_scene(tmp_path / "s.json") == Scene("black", (a, b))


@pytest.mark.parametrize("data, message", [
    ({"objects": []}, "background: missing"),
    ({"background": "pink"}, "background: 'pink' is not one of"),
    ({"background": "black", "objects": {}}, "objects: expected a list"),
    ({"background": "black", "objects": [{"shape": "circle", "color": "red", "size": "large"}]},
     "objects[0].cell: missing"),
    ({"background": "black", "objects": [{"shape": "star", "color": "red", "size": "large", "cell": "top"}]},
     "objects[0].shape: 'star'"),
    ({"background": "black", "objects": [{"shape": "circle", "color": "red", "size": "huge", "cell": "top"}]},
     "objects[0].size: 'huge'"),
    ({"background": "black", "objects": [{"shape": "circle", "color": "red", "size": "small", "cell": "top"}] * 2},
     "objects: two objects share a cell (top)"),
    ({"background": ["black"], "objects": []}, "background: ['black'] is not one of"),  # unhashable values
    ({"background": "black", "objects": [{"shape": "circle", "color": {"r": 1}, "size": "large", "cell": "top"}]},
     "objects[0].color: {'r': 1} is not one of"),
])
def test_bad_scenes_name_the_field(data, message):
    with pytest.raises(ValueError) as err:
        Scene.from_dict(data)
    assert message in str(err.value)


def test_cli_render(tmp_path):
    from openbagel.shapes.cli import main
    scene = Scene("gray", (Obj("triangle", "orange", "large", "bottom right"),))
    save_scene(scene, tmp_path / "s.json")
    main(["shapes", "render", str(tmp_path / "s.json"), str(tmp_path / "s.png")])
    image = Image.open(tmp_path / "s.png")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(render(scene)))


def test_cli_render_bad_field_is_one_line_and_nonzero(tmp_path):
    (tmp_path / "bad.json").write_text('{"background": "black", "objects": [{"shape": "circle", '
                                       '"color": "pink", "size": "large", "cell": "top"}]}')
    proc = subprocess.run([sys.executable, "-m", "openbagel.shapes.cli", "shapes", "render",
                           str(tmp_path / "bad.json"), str(tmp_path / "o.png")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "objects[0].color: 'pink'" in proc.stderr
