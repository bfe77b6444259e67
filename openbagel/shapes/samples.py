"""Training samples: Shapes tasks laid out as the interleaved sequences BAGEL trains on.

Layouts (a `+think` variant puts the system prompt first and the thought, with loss, before the output):
- generate:  [prompt] [target image: loss, no clean copies]
- edit:      [source image: VAE+ViT] [instruction] [target image: loss, no clean copies]
- question:  [source image: ViT only] [question] [answer: loss]   (think: `<think>facts</think> answer`)
- chat:      [source image] then per turn [instruction] [target: loss, clean VAE+ViT copies except the last]
Texts given to the model are the canonical ones half of the time and light paraphrases otherwise; answers,
thoughts and images are always canonical.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from openbagel.data.interleaved import ImageItem, Sample, TextItem

from .render import render
from .tasks import TRAIN_SEED_LIMIT, Task, task_stream

from openbagel.config import PRESETS

# The embedded model's think-mode system prompts are checkpoint data; the samples use the same strings.
GEN_THINK_SYSTEM = PRESETS["shapes-tiny"].think_system_prompts["generation"]
UND_THINK_SYSTEM = PRESETS["shapes-tiny"].think_system_prompts["understanding"]
CANONICAL_SHARE = 0.5

_PARAPHRASES = {
    "generate": ("draw {}", "an image of {}", "generate {}", "a picture of {}"),
    "edit": ("please {}", "{} and keep the rest", "now {}", "{}, nothing else"),
    "question": ("look at the image. {}", "question: {}", "about this picture: {}"),
}
_FAMILY = {"generate": "generate", "edit": "edit", "reason_edit": "edit", "chat": "edit",
           "question": "question", "reason_question": "question"}


def phrase(task_kind: str, text: str, rng: random.Random) -> str:
    """The canonical text (CANONICAL_SHARE of the time) or a paraphrase that keeps it verbatim inside."""
    if rng.random() < CANONICAL_SHARE:
        return text
    return rng.choice(_PARAPHRASES[_FAMILY[task_kind]]).format(text)


def training_sample(task: Task, *, think: bool, rng: random.Random, target_copies: int = 1) -> Sample:
    """`target_copies` > 1 adds extra noisy copies of each target image: each draws its own timestep
    and sees the same context (noise splits never see each other), so one context buys several
    flow-matching targets — cheap supervision where the layout is decided."""
    family = _FAMILY[task.kind]
    items: Sample = []
    if think:
        items.append(TextItem(UND_THINK_SYSTEM if family == "question" else GEN_THINK_SYSTEM))
    if family == "question":
        step = task.steps[0]
        answer = f"{step.thought} {step.answer}" if think else step.answer
        return items + [ImageItem(render(task.source), vae=False, vit=True),
                        TextItem(phrase(task.kind, step.text, rng)), TextItem(answer, loss=True)]
    if task.source is not None:
        items.append(ImageItem(render(task.source)))
    for i, step in enumerate(task.steps):
        last = i == len(task.steps) - 1
        items.append(TextItem(phrase(task.kind, step.text, rng)))
        if think:
            items.append(TextItem(step.thought, loss=True))
        target = render(step.scene)
        items.extend(ImageItem(target, loss=True, vae=False, vit=False) for _ in range(target_copies - 1))
        items.append(ImageItem(target, loss=True, vae=not last, vit=not last))
    return items


def sample_stream(seed: int, mix: dict[str, float], think_prob: float | dict[str, float],
                  target_copies: int = 1) -> Iterator[Sample]:
    """Endless training samples; `mix` maps `kind` or `kind:sub` to a weight. `think_prob` is one
    probability or one per task kind (key "default" for the others). Seeds must be training
    seeds, 0 <= seed < TRAIN_SEED_LIMIT: evaluation owns the rest (see tasks.TRAIN_SEED_LIMIT)."""
    if not 0 <= seed < TRAIN_SEED_LIMIT:
        raise ValueError(f"seed: {seed} is not a training seed (0 <= seed < {TRAIN_SEED_LIMIT})")
    rng = random.Random(seed)
    probs = think_prob if isinstance(think_prob, dict) else {"default": think_prob}
    for task in task_stream(rng, mix):
        p = probs.get(task.kind, probs.get("default", 0.0))
        yield training_sample(task, think=rng.random() < p, rng=rng, target_copies=target_copies)
