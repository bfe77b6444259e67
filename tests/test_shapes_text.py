"""Texts: captions, refs, instructions and thoughts, verbatim against the spec's examples."""

import pytest

from openbagel.shapes.edits import Edit, plan
from openbagel.shapes.scene import Obj, Scene
from openbagel.shapes.tasks import size_match_task
from openbagel.shapes.text import a, caption, parse_caption, refs

RED_CIRCLE = Obj("circle", "red", "large", "top left")
BLUE_SQUARE = Obj("square", "blue", "small", "center")
GREEN_TRIANGLE = Obj("triangle", "green", "large", "bottom right")


def test_caption_spec_example():
    scene = Scene("black", (GREEN_TRIANGLE, BLUE_SQUARE, RED_CIRCLE))
    assert caption(scene) == ("a large red circle at the top left, a small blue square at the center and "
                              "a large green triangle at the bottom right on a black background")
    assert caption(Scene("gray")) == "nothing on a gray background"
    assert caption(Scene("white", (BLUE_SQUARE,))) == "a small blue square at the center on a white background"
    assert caption(Scene("white", (Obj("circle", "orange", "small", "top"),))) == \
        "a small orange circle at the top on a white background"


def test_article():
    assert a("orange circle") == "an orange circle"
    assert a("red circle") == "a red circle"


@pytest.mark.parametrize("scene", [
    Scene("black", (GREEN_TRIANGLE, BLUE_SQUARE, RED_CIRCLE)), Scene("gray"),
    Scene("white", (Obj("diamond", "orange", "large", "left"), Obj("circle", "orange", "small", "right")))])
def test_parse_caption_inverts_caption(scene):
    assert parse_caption(caption(scene)) == scene


@pytest.mark.parametrize("text", ["a large red circle at the top left", "a red circle at the top on a black background",
                                  "an large red circle at the top on a black background",
                                  "a large red circle at the center and a large red circle at the top left on a black background"])
def test_parse_caption_rejects_non_canonical(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_refs_are_the_unique_forms():
    other_red = Obj("square", "red", "small", "top")
    scene = Scene("black", (RED_CIRCLE, other_red, Obj("circle", "blue", "small", "center")))
    assert refs(scene, RED_CIRCLE) == ["the red circle", "the circle at the top left"]
    assert refs(scene, other_red) == ["the square", "the red square", "the square at the top"]
    assert refs(scene, RED_CIRCLE, avoid="red") == ["the circle at the top left"]
    assert refs(scene, other_red, avoid="top") == ["the square", "the red square"]


def test_edit_instructions_follow_the_table():
    t = RED_CIRCLE
    assert Edit("recolor", t, "blue").instruction("the red circle") == "make the red circle blue"
    assert Edit("remove", t).instruction() == "remove the circle at the top left"
    assert Edit("add", Obj("square", "orange", "small", "bottom")).instruction() == \
        "add a small orange square at the bottom"
    assert Edit("move", t, "center").instruction("the circle") == "move the circle to the center"
    assert Edit("resize", t, "smaller").instruction() == "make the circle at the top left smaller"
    assert Edit("reshape", t, "triangle").instruction() == "turn the circle at the top left into a triangle"
    assert Edit("background", value="white").instruction() == "make the background white"
    assert Edit("swap", t, other=BLUE_SQUARE).instruction("the circle", "the blue square") == \
        "swap the circle and the blue square"


def test_plans_are_row_major_with_cell_refs():
    edits = [Edit("remove", GREEN_TRIANGLE), Edit("remove", RED_CIRCLE), Edit("recolor", BLUE_SQUARE, "red")]
    assert plan(edits) == ("remove the circle at the top left; make the square at the center red; "
                           "remove the triangle at the bottom right")


def test_reasoning_thought_spec_example():
    source = Scene("black", (Obj("square", "blue", "large", "center"), Obj("circle", "red", "small", "top left")))
    task = size_match_task(source)
    assert task.text == "make the large shape the same color as the small shape"
    assert task.thought == ("<think>the large shape is the blue square at the center. the small shape is the red "
                            "circle at the top left. so: make the square at the center red</think>")
    assert task.expected == Scene("black", (Obj("square", "red", "large", "center"),
                                            Obj("circle", "red", "small", "top left")))
