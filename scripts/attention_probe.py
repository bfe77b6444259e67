"""Does the language model look at the object a question names? Attention and a swapped-image control.

For `what color is {ref}?` questions on fresh Shapes scenes, run the checkpoint teacher-forced (the
training layout: ViT image, question, answer) and report per layer the attention that the token
predicting the answer pays to the image tokens, and how much of it lands on the named object's
tokens (the ViT patches that change when that object is removed) relative to a uniform share
(selectivity 1.0: the object gets no more than its area). The control runs the same questions
against another scene's image: if accuracy does not drop, the answer does not come from the image.
Usage: python scripts/attention_probe.py openbagel/weights/shapes-tiny [-n 60]
"""

import argparse
import dataclasses
import math
import random
from contextlib import contextmanager

import torch

import openbagel.models.qwen2_mot as qwen2_mot
from openbagel.checkpoint import load_checkpoint
from openbagel.data.batch import VIT
from openbagel.data.packing import PackingConfig, collate, tokenize
from openbagel.processing import patchify_image, resize, to_tensor
from openbagel.shapes.render import render
from openbagel.shapes.samples import training_sample
from openbagel.shapes.tasks import make_task
from openbagel.shapes.text import refs

QUESTION = "what color is "


@contextmanager
def recorded_attention(store: list[torch.Tensor]):
    """Record the softmax weights [B, Hq, L, S] of every LLM attention call (recomputed beside SDPA)."""
    sdpa = qwen2_mot.attention

    def spy(q, k, v, mask):
        k_full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k_full.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        store.append(scores.softmax(-1))
        return sdpa(q, k, v, mask)

    qwen2_mot.attention = spy
    try:
        yield
    finally:
        qwen2_mot.attention = sdpa


def object_patches(scene, obj, cfg) -> torch.Tensor:
    """Indices of the ViT patches whose pixels change when `obj` is removed from `scene`."""
    without = dataclasses.replace(scene, objects=tuple(o for o in scene.objects if o is not obj))
    p = cfg.vit.patch_size
    a, b = (patchify_image(to_tensor(resize(render(s), cfg.vit_transform)), p) for s in (scene, without))
    return ((a - b).abs().amax(-1) > 0).nonzero().flatten()


def teacher_forced(model, sample, tok, cfg, index: int = 0):
    """Run one sample in the training layout, recording attention: (batch, per-layer weights [B, Hq, L, S],
    the position that predicts the answer's first token, the ViT token positions)."""
    packing = PackingConfig()
    batch = collate([[tokenize(sample, index, tok, cfg, packing, seed=0)]], packing)
    store: list[torch.Tensor] = []
    with torch.no_grad(), recorded_attention(store):
        model.forward_train(batch)
    first = int((batch.labels[0] != -100).nonzero()[0])
    return batch, store, first, (batch.token_kind[0] == VIT).nonzero().flatten()


def print_per_head(title: str, left: torch.Tensor, right: torch.Tensor, right_format: str = "5.2f") -> None:
    """A table with one row per layer: two per-head statistics side by side."""
    print(title)
    for layer in range(left.shape[0]):
        print(f"{layer:>5}  {' '.join(f'{x:5.2f}' for x in left[layer])}      "
              f"{' '.join(f'{x:{right_format}}' for x in right[layer])}")


def named_object(task):
    ref = task.steps[0].text.removeprefix(QUESTION).removesuffix("?")
    return next(o for o in task.source.objects if ref in refs(task.source, o))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=60, help="questions")
    args = ap.parse_args()
    ck = load_checkpoint(args.model)
    model, cfg, tok = ck.model.float().eval(), ck.config, ck.tokenizer
    rng = random.Random(0)
    tasks = [make_task(rng, "question", "color") for _ in range(args.n)]
    layers = cfg.llm.num_hidden_layers
    image_mass = torch.zeros(layers, cfg.llm.num_attention_heads)
    selectivity = torch.zeros_like(image_mass)
    right = {"own image": 0, "another scene's image": 0}
    answer_logits: dict[str, torch.Tensor] = {}  # the last forward's logits at its answer positions
    model.language_model.lm_head.register_forward_hook(lambda module, inputs, out: answer_logits.update(last=out))
    for i, task in enumerate(tasks):
        own = training_sample(task, think=False, rng=random.Random(i))
        other = training_sample(tasks[(i + 1) % len(tasks)], think=False, rng=random.Random(i))
        for name, sample in (("own image", own), ("another scene's image", [other[0], *own[1:]])):
            # The lm_head hook keeps the logits of the answer positions.
            batch, store, first, vit = teacher_forced(model, sample, tok, cfg, i)
            right[name] += int(int(answer_logits['last'][0].argmax()) == int(batch.labels[0, first]))
            if name != "own image":
                continue
            obj = vit[object_patches(task.source, named_object(task), cfg)]
            share = len(obj) / len(vit)
            for layer, weights in enumerate(store):
                row = weights[0, :, first]  # [Hq, S]
                on_image, on_object = row[:, vit].sum(-1), row[:, obj].sum(-1)
                image_mass[layer] += on_image / args.n
                selectivity[layer] += on_object / on_image.clamp(min=1e-9) / share / args.n
    print(f"{args.n} colour questions, first answer token right: "
          + ", ".join(f"{k} {v / args.n:.1%}" for k, v in right.items()))
    print_per_head("layer  attention on image tokens per head      object selectivity per head (1.0 = uniform)",
                   image_mass, selectivity)


if __name__ == "__main__":
    main()
