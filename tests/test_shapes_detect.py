"""Detector: exact on clean renders, robust to noise, blur and JPEG, rejects noise blobs and junk."""

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from openbagel.shapes.detect import detect
from openbagel.shapes.perturb import CONDITIONS
from openbagel.shapes.render import render
from openbagel.shapes.scene import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, Obj, Scene
from openbagel.shapes.tasks import random_scene


def scenes(n, seed):
    rng = random.Random(seed)
    return [random_scene(rng, rng.randint(0, 9)) for _ in range(n)]


def test_every_object_on_every_background():
    for i, (shape, size, color) in enumerate((s, z, c) for s in SHAPES for z in SIZES for c in COLORS):
        for background in BACKGROUNDS:
            scene = Scene(background, (Obj(shape, color, size, CELLS[i % 9]),))
            assert detect(render(scene)) == scene


def test_clean_random_scenes():
    assert all(detect(render(s)) == s for s in scenes(300, seed=1))


@pytest.mark.parametrize("condition", [c for c in CONDITIONS if c != "clean"])
def test_perturbed_random_scenes(condition):
    rng = np.random.default_rng(0)
    sample = scenes(150, seed=2)
    correct = sum(detect(CONDITIONS[condition](render(s), rng)) == s for s in sample)
    assert correct / len(sample) >= 0.995


def test_noise_specks_are_not_objects():
    image = render(Scene("black"))
    draw = ImageDraw.Draw(image)
    for x, y in [(5, 5), (30, 30), (50, 12), (12, 50)]:
        draw.rectangle([x, y, x + 1, y + 1], fill=(230, 25, 25))  # 4-pixel specks
    assert detect(image) == Scene("black")


def test_junk_blob_is_unreadable_and_wrong_size_raises():
    image = render(Scene("white"))
    ImageDraw.Draw(image).rectangle([23, 23, 41, 26], fill=(30, 90, 230))  # a thin bar, no shape of the world
    assert detect(image) is None
    with pytest.raises(ValueError, match="64x64"):
        detect(Image.new("RGB", (32, 32)))
