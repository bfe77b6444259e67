"""Multi-turn editing: each turn edits the latest image with the whole conversation in view.

A turn adds the instruction (and, with think, the thought) to the context, draws an image, then adds
that image to the context as a VAE block and a ViT block, so the next instruction refers to it. The
image-guidance context keeps every text and no image. `undo` restores the state before the last
turn; `save`/`load` write the conversation (texts, thoughts, PNGs, seeds) and rebuild the context by
replaying it: every random draw that enters the context comes from a generator seeded per image, so a
restored session continues exactly as the original would have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..processing import resize, to_rgb, to_tensor
from .pipeline import BagelOutput, Decoded, DrawState, InputError, Request, _seed

if TYPE_CHECKING:
    from .pipeline import BagelPipeline

SESSION_FILE = "session.json"


@dataclass
class Turn:
    instruction: str
    seed: int
    image: Image.Image
    thought: str | None = None
    raw_thought: str | None = None


def _context_generator(seed: int, index: int) -> torch.Generator:
    """The generator of the VAE posterior draw of context image `index` (0 = the source image)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)  # any seed below 2**63


class Conversations:
    """B conversations advanced turn by turn in one batch (the engine of `EditSession` and `chat` tasks)."""

    def __init__(self, pipe: "BagelPipeline", images: list[Image.Image | None], *, think: list[bool],
                 seeds: list[int], settings: dict[str, Any]) -> None:
        self.pipe = pipe
        self.seeds = seeds
        if any(img is None for img in images):
            raise InputError("every conversation starts from an image")
        reqs = [Request("edit", "turn", img, th, seed=s, settings=dict(settings)) for img, th, s in zip(images, think, seeds)]
        self.prepared = [pipe._prepare(r) for r in reqs]
        self.state = DrawState.start(pipe, self.prepared)
        self.images_added = 0
        self._add_context_images([p.vae_image for p in self.prepared], [p.vit_image for p in self.prepared])

    def _add_context_images(self, vae: list, vit: list) -> None:
        gens = [_context_generator(s, self.images_added) for s in self.seeds]
        self.state.add_images(vae, vit, gens)
        self.images_added += 1

    def turn(self, instructions: list[str], seeds: list[int], *, on_text=None, callback=None,
             replay: tuple[list[Image.Image], list[str | None]] | None = None) -> list[BagelOutput]:
        """Advance every conversation by one instruction; `replay` re-feeds saved images and thoughts."""
        from .pipeline import _check_text

        texts = [_check_text(t, "instruction") for t in instructions]
        for p, seed in zip(self.prepared, seeds):
            p.generator = torch.Generator().manual_seed(seed)
        if replay is None:
            thoughts = self.state.add_turn_text(texts, on_text)
            images = self.state.generate(callback)
        else:
            images, raw = replay
            thoughts = self.state.add_turn_text(texts, replay_thoughts=raw)
        self._add_context_images([to_tensor(to_rgb(img)) for img in images], [self._vit_tensor(img) for img in images])
        return [Decoded.image_output(img, thought) for img, thought in zip(images, thoughts)]

    def _vit_tensor(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(resize(to_rgb(image), self.pipe.config.vit_transform))

    def snapshot(self) -> tuple:
        s = self.state
        return (s.ctx.fork(), list(s.img_same), list(s.shapes), self.images_added)

    def restore(self, snap: tuple) -> None:
        ctx, img_same, shapes, added = snap
        self.state.ctx, self.state.img_same, self.state.shapes, self.images_added = ctx.fork(), list(img_same), list(shapes), added


class EditSession:
    """One multi-turn editing conversation. `session.edit("make the circle blue")` -> BagelOutput."""

    def __init__(self, pipe: "BagelPipeline", image: Image.Image | None, *, think: bool = False, seed: int = 0,
                 settings: dict[str, Any] | None = None) -> None:
        if image is None:
            raise InputError("a session starts from an image")
        self.pipe, self.source, self.think, self.seed = pipe, to_rgb(image), think, seed
        self.settings = dict(settings or {})
        self.turns: list[Turn] = []
        self._conv = Conversations(pipe, [self.source], think=[think], seeds=[seed], settings=self.settings)
        self._history: list[tuple] = []

    @property
    def image(self) -> Image.Image:
        """The latest image (the source before the first turn)."""
        return self.turns[-1].image if self.turns else self.source

    def edit(self, instruction: str, *, seed: int | None = None, on_text=None, callback_on_step_end=None) -> BagelOutput:
        seed = self.seed + len(self.turns) + 1 if seed is None else _seed(seed)
        self._history.append(self._conv.snapshot())
        try:
            out = self._conv.turn([instruction], [seed], on_text=on_text, callback=callback_on_step_end)[0]
        except Exception:
            self._conv.restore(self._history.pop())
            raise
        self.turns.append(Turn(instruction, seed, out.images[0], out.thought, out.raw_text))
        return out

    def undo(self) -> Turn:
        """Forget the last turn; the next edit applies to the image before it."""
        if not self.turns:
            raise InputError("nothing to undo: the session has no turns")
        self._conv.restore(self._history.pop())
        return self.turns.pop()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.source.save(directory / "source.png")
        turns = []
        for k, t in enumerate(self.turns):
            name = f"turn_{k + 1:02d}.png"
            t.image.save(directory / name)
            turns.append({"instruction": t.instruction, "seed": t.seed, "image": name,
                          "thought": t.thought, "raw_thought": t.raw_thought})
        meta = {"version": 1, "think": self.think, "seed": self.seed, "settings": self.settings, "turns": turns}
        tmp = directory / (SESSION_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(directory / SESSION_FILE)
        return directory

    @classmethod
    def load(cls, pipe: "BagelPipeline", directory: str | Path) -> "EditSession":
        """The session `save(directory)` wrote, ready to continue exactly as if it had never stopped."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / SESSION_FILE).read_text())
            source = Image.open(directory / "source.png")
            source.load()
            turns = []
            for t in meta["turns"]:
                name = Path(t["image"]).name  # never follow a path out of the session folder
                image = Image.open(directory / name)
                image.load()
                turns.append(Turn(t["instruction"], t["seed"], to_rgb(image), t.get("thought"),
                                  t.get("raw_thought")))
            think, seed, settings = meta["think"], meta["seed"], meta["settings"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise InputError(f"{directory} is not a saved session ({reason})") from None
        return cls.replay(pipe, source, turns, think=think, seed=seed, settings=settings)

    @classmethod
    def replay(cls, pipe: "BagelPipeline", source: Image.Image, turns: list[Turn], *, think: bool, seed: int,
               settings: dict[str, Any]) -> "EditSession":
        """Rebuild a session from its recorded turns (no denoising): the saved-folder and the server's store."""
        session = cls(pipe, source, think=think, seed=seed, settings=settings)
        for t in turns:
            session._history.append(session._conv.snapshot())
            session._conv.turn([t.instruction], [t.seed], replay=([t.image], [t.raw_thought]))
            session.turns.append(t)
        return session
