"""Shared pytest fixtures. Keep each small and clearly named; other test modules add theirs here."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The property tests check values, not speed: on a loaded 2-core CI machine one draw can take seconds
# (a run failed on "input generation is slow"), so neither a deadline nor the too-slow check applies.
settings.register_profile("openbagel", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("openbagel")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random checkpoint of the `tiny` preset (a few MB; seconds on a CPU), with a think-capable tokenizer."""
    from openbagel.checkpoint import random_checkpoint
    from openbagel.config import preset
    from openbagel.tokenizer import train_tokenizer

    texts = ["a red circle at the top left on a white background", "make the square blue",
             "what color is the triangle?", "remove the diamond", "think about the layout, then draw."] * 10
    tokenizer = train_tokenizer(texts, vocab_size=300, extra_special_tokens=("<think>", "</think>"))
    return random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-random", preset("tiny"), tokenizer)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint: Path):
    """The tiny checkpoint loaded on CPU in fp32, progress bars off."""
    from openbagel.inference.pipeline import BagelPipeline

    pipe = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe
