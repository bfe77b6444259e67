"""`BagelPipeline`: generate, edit, understand and multi-turn editing, diffusers-style.

The pipeline owns strings and images: it checks inputs, resizes images with the checkpoint's rules,
builds the three guidance contexts exactly as the official inferencer does (reference 5.2), and calls
the engine. Every task runs through one batched path (`run`), so a single call and a batch file of
sixteen tasks take the same code; the single-task methods are thin wrappers.

Contexts of one task (rows of a KV cache):
  gen      (think system prompt) + [input image: VAE then ViT] + text + (generated thought)
  cfg_text gen as it was before the latest text         -> text guidance
  cfg_img  (system prompt) + all texts, no image at all -> image guidance
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..checkpoint import LoadedCheckpoint, load_checkpoint
from ..processing import resize, to_pil, to_rgb, to_tensor
from . import onednn
from .engine import Engine, ImageJob, TextParams
from .kv_cache import KVCache
from .offload import offload_layers
from .quantize import check_mode as check_quantize_mode
from .quantize import quantize as quantize_model
from .settings import TaskSettings, resolve

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
MAX_PROMPT_CHARS = 32_000
RESERVED_POSITIONS = 512  # of the model's context, kept for system prompts, images and the answer
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"


class InputError(ValueError):
    """Bad user input: the message says what was wrong and what to do."""


@dataclass
class BagelOutput:
    images: list[Image.Image] = field(default_factory=list)
    text: str | None = None  # the answer (understanding), without the thought
    thought: str | None = None  # the text inside <think>...</think>
    raw_text: str | None = None  # everything the model wrote
    finish_reason: str | None = None  # text decoding: "stop" (end token) or "length" (token limit reached)
    prompt_tokens: int | None = None  # context tokens the decoded text read (image tokens included)
    completion_tokens: int | None = None  # tokens the model wrote (the thought included)


@dataclass
class Request:
    """One task for `BagelPipeline.run`."""

    task: str  # generate | edit | understand
    text: str  # prompt, instruction or question
    image: Image.Image | None = None
    think: bool = False
    seed: int | None = None
    generator: torch.Generator | None = None
    height: int | None = None
    width: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def split_thought(text: str) -> tuple[str | None, str]:
    """('thought', 'answer') from '<think>thought</think> answer'.

    A thought cut short by the token limit ('<think>so: make' with no end tag) is all thought, no answer.
    """
    m = THINK_RE.search(text)
    if m:
        return m.group(1).strip(), text[m.end():].strip()
    head = text.lstrip()
    if head.startswith("<think>"):
        return head.removeprefix("<think>").strip(), ""
    return None, text.strip()


class BagelPipeline:
    def __init__(self, checkpoint: LoadedCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        tok = self.tokenizer
        self.engine = Engine(checkpoint.model, checkpoint.vae, tok.bos_id, tok.eos_id,
                             tok.start_of_image_id, tok.end_of_image_id)
        self.progress_bar_enabled = True
        self.progress_bar_options: dict[str, Any] = {}

    # ----- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path | None = None, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, offload: bool = False,
                        quantize: str | None = None, pack: bool | None = None,
                        torch_dtype: torch.dtype | str | None = None) -> "BagelPipeline":
        """Load a checkpoint directory or hub id (default: the embedded Shapes model shipped in the package).

        `offload=True` keeps the decoder layers in CPU memory and streams each to `device` when it runs
        (`inference/offload.py`): for GPUs that cannot hold the whole model. `quantize` (a mode of
        `inference/quantize.py`: int8, int4, torchao-int8, torchao-int4, torchao-fp8, bnb-int8, bnb-nf4) maps the weights
        from the file and quantises the language model (in int8 / int4 also the token embedding and the ViT)
        layer by layer on its way to `device`, converting one layer at a time to `dtype` (the 7B loads on a
        24 GiB CPU machine this way, and with int4 runs in a 12 GiB memory cgroup). `pack`
        runs the fp32 Linear layers on oneDNN with weights reordered on each layer's first call
        (`inference/onednn.py`; default: on for fp32 on CPU without quantize or offload; pass False to
        quantise or train the model later). `torch_dtype` is diffusers' name for `dtype`.
        """
        if torch_dtype is not None:
            if dtype is not None:
                raise InputError("give dtype or torch_dtype (its diffusers name), not both")
            dtype = torch_dtype
        device = _check_device(device or _default_device())
        dtype = _resolve_dtype(dtype, device)
        path = path_or_repo_id if path_or_repo_id is not None else EMBEDDED_MODEL
        if quantize is not None:
            check_quantize_mode(quantize, device)  # before minutes of loading
        if quantize and offload:
            raise ValueError("quantize and offload do not combine: pick one (quantize shrinks the weights, "
                             "offload streams them from CPU memory)")
        if pack and (offload or quantize or not onednn.available(device, dtype)):
            raise ValueError("pack=True needs fp32 weights on CPU without quantize or offload")
        if not (offload or quantize):
            checkpoint = load_checkpoint(path, device=device, dtype=dtype)
            if pack or (pack is None and onednn.available(device, dtype)):
                onednn.pack_linears(checkpoint.model)
            return cls(checkpoint)
        checkpoint = load_checkpoint(path, device="cpu", dtype=None if quantize else dtype)  # quantize: mmap'd
        if quantize:
            quantize_model(checkpoint.model, quantize, device=device, dtype=dtype)
        else:
            offload_layers(checkpoint.model, device)
        checkpoint.vae.to(device)
        return cls(checkpoint)

    def set_progress_bar_config(self, disable: bool = False, **tqdm_options: Any) -> None:
        """Turn the denoising progress bar off, or pass tqdm options (`leave`, `desc`, `file`, ...)."""
        self.progress_bar_enabled = not disable
        self.progress_bar_options = tqdm_options

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def default_settings(self, task: str) -> dict[str, Any]:
        """The settings a `task` (generate, edit, understand) runs with when a call gives none: BAGEL's
        defaults with this checkpoint's own on top (the embedded model stores tuned ones)."""
        flow_text = resolve(task, {}, self.config.task_defaults)
        values = dict(vars(flow_text.flow)) if flow_text.flow is not None else {}
        values.update(vars(flow_text.text))
        return values

    # ----- single tasks ----------------------------------------------------------------------------

    def generate(self, prompt: str, *, think: bool = False, height: int | None = None, width: int | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None, **settings: Any) -> BagelOutput:
        """Text to image.

        `seed` or `generator` (not both) fixes the noise. Settings, under BAGEL's or diffusers' names:
        num_inference_steps (num_timesteps), guidance_scale (cfg_text_scale), cfg_interval, cfg_renorm_type,
        cfg_renorm_min, timestep_shift, and for a thought (think=True) max_new_tokens (max_think_token_n),
        do_sample, temperature, top_k, top_p. Unset ones keep `default_settings("generate")`.
        `callback_on_step_end(pipe, step, t, {"latents": [...]})` sees (and may replace) the latents after
        each step; `on_text(row, text)` the thought as it is written.
        """
        callbacks = _pop_callbacks(settings)
        req = Request("generate", prompt, None, think, seed, generator, height, width, settings)
        return self.run([req], **callbacks)[0]

    def edit(self, image: Image.Image, instruction: str, *, think: bool = False, seed: int | None = None,
             generator: torch.Generator | None = None, **settings: Any) -> BagelOutput:
        """Edit an image following an instruction. The output has the input's size after the checkpoint's
        resizing (its limits, sides rounded to its stride). Settings as `generate`, plus image_guidance_scale
        (cfg_img_scale); defaults: `default_settings("edit")`."""
        callbacks = _pop_callbacks(settings)
        req = Request("edit", instruction, image, think, seed, generator, settings=settings)
        return self.run([req], **callbacks)[0]

    def understand(self, image: Image.Image | None, question: str, *, think: bool = False, seed: int | None = None,
                   generator: torch.Generator | None = None, **settings: Any) -> BagelOutput:
        """Answer a question about an image (or a plain text prompt when image is None). Settings:
        max_new_tokens, do_sample, temperature, top_k, top_p; defaults: `default_settings("understand")`.
        The output's `finish_reason` says whether the model ended the answer ("stop") or the limit did."""
        callbacks = _pop_callbacks(settings)
        req = Request("understand", question, image, think, seed, generator, settings=settings)
        return self.run([req], **callbacks)[0]

    def session(self, image: Image.Image | None = None, *, think: bool = False, seed: int = 0,
                **settings: Any):
        """A multi-turn editing session starting from `image` (see `EditSession`; `EditSession.load` restores
        one saved with `session.save(folder)`). Settings as `edit`, fixed for the whole session."""
        from .session import EditSession

        return EditSession(self, _check_image(image) if image is not None else None, think=think,
                           seed=_seed(seed), settings=settings)

    # ----- the batched path ------------------------------------------------------------------------

    def run(self, requests: list[Request], *, callback_on_step_end: Callable | None = None,
            on_text: Callable[[int, str], None] | None = None) -> list[BagelOutput]:
        """Run many tasks; tasks of one kind share forwards, and each task gets what it would get alone.
        Raises InputError before any work on bad input."""
        if not isinstance(requests, (list, tuple)) or not all(isinstance(r, Request) for r in requests):
            raise InputError("run takes a list of openbagel.Request objects, e.g. Request('generate', 'a red circle')")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InputError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        prepared = [self._prepare(r) for r in requests]
        outputs: list[BagelOutput | None] = [None] * len(requests)
        for task in ("understand", "generate", "edit"):
            idx = [i for i, r in enumerate(requests) if r.task == task]
            if not idx:
                continue
            batch = [prepared[i] for i in idx]
            results = (self._understand(batch, on_text) if task == "understand"
                       else self._draw(batch, callback_on_step_end, on_text))
            for i, out in zip(idx, results):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    # ----- preparation -----------------------------------------------------------------------------

    def _prepare(self, req: Request) -> "_Prepared":
        if req.task not in ("generate", "edit", "understand"):
            raise InputError(f"unknown task {req.task!r}; use generate, edit or understand")
        text = _check_text(req.text, {"generate": "prompt", "edit": "instruction", "understand": "question"}[req.task])
        self._check_length(text)
        options = dict(req.settings)
        if options.pop("num_images_per_prompt", 1) != 1:
            raise InputError("num_images_per_prompt: one image per call; for several, call pipe.run with one "
                             "Request per image (seeds seed, seed + 1, ...) or the CLI's -n")
        tensor_inputs = options.pop("callback_on_step_end_tensor_inputs", ["latents"])
        if not set(tensor_inputs) <= {"latents"}:
            raise InputError(f"callback_on_step_end_tensor_inputs: only 'latents' is offered, got {tensor_inputs!r}")
        try:
            settings = resolve(req.task, options, self.config.task_defaults)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if not isinstance(req.think, bool):
            raise InputError(f"think must be True or False, got {req.think!r}")
        if req.think and not self.config.think_system_prompts:
            raise InputError("this checkpoint has no think-mode system prompts; call without think")
        generator = req.generator
        if isinstance(generator, (list, tuple)) and len(generator) == 1:
            generator = generator[0]  # diffusers' one-generator-per-image list, for one image
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type(req.generator).__name__}")
        if generator is not None and req.seed is not None:
            raise InputError("give seed or generator, not both")
        generator = generator or torch.Generator().manual_seed(_seed(req.seed))
        vae_image = vit_image = None
        height, width = req.height, req.width
        if req.task == "edit" and req.image is None:
            raise InputError("edit needs an input image")
        if req.image is not None:
            if req.task == "generate":
                raise InputError("generate takes no input image; use edit")
            image = resize(to_rgb(_check_image(req.image)), self.config.vae_transform)
            width, height = image.size
            vae_image = to_tensor(image) if req.task == "edit" else None
            vit_image = to_tensor(resize(image, self.config.vit_transform))
        elif req.task == "generate":
            height, width = self._check_size(height, width)
        return _Prepared(req, text, settings, generator, vae_image, vit_image, height, width)

    def _check_length(self, text: str) -> None:
        """A text must leave the model room among the positions it was trained on (and answers grow
        quadratically slower with the context)."""
        context = self.config.llm.max_position_embeddings
        limit = context - min(RESERVED_POSITIONS, context // 4)
        n = len(self.tokenizer.encode(text))
        if n > limit:
            raise InputError(f"the text is {n} tokens; this model reads at most {limit} (its context is "
                             f"{context} positions); shorten it")

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        dh, dw = self.config.default_image_size
        height = dh if height is None else height  # 0 is an error, not 'the default'
        width = dw if width is None else width
        stride, top = self.config.latent_downsample, self.config.max_image_side
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(f"{name} must be an integer number of pixels, got {v!r}")
            if v % stride or not (stride <= v <= top):
                raise InputError(f"{name} must be a multiple of {stride} between {stride} and {top}, got {v}")
        return height, width

    # ----- understanding ---------------------------------------------------------------------------

    def _understand(self, batch: list["_Prepared"], on_text) -> list[BagelOutput]:
        eng, tok = self.engine, self.tokenizer
        ctx = eng.new_cache(len(batch))
        eng.prefill_text(ctx, [self._system_block(p, "understanding") for p in batch])
        eng.prefill_vit_images(ctx, [p.vit_image for p in batch])
        eng.prefill_text(ctx, [tok.text_block(p.text) for p in batch])
        return [d.output() for d in self._decode(ctx, batch, list(range(len(batch))), on_text)]

    # ----- generation and editing ------------------------------------------------------------------

    def _draw(self, batch: list["_Prepared"], callback, on_text) -> list[BagelOutput]:
        state = DrawState.start(self, batch)
        state.add_images([p.vae_image for p in batch], [p.vit_image for p in batch], [p.generator for p in batch])
        thoughts = state.add_turn_text([p.text for p in batch], on_text)
        return [Decoded.image_output(img, d) for img, d in zip(state.generate(callback), thoughts)]

    def _system_block(self, p: "_Prepared", kind: str) -> list[int]:
        return self.tokenizer.text_block(self.config.think_system_prompts[kind]) if p.req.think else []

    def _decode(self, ctx: KVCache, batch: list["_Prepared"], rows: list[int], on_text) -> list["Decoded"]:
        """Decode text from the given rows of a forked context; streams partial text to `on_text`.

        Rows that share their text settings decode together; rows with other settings (a longer token
        limit, sampling) in their own group, so each row gets what it would get alone.
        """
        groups: dict[TextParams, list[int]] = {}
        for r in rows:
            groups.setdefault(batch[r].settings.text, []).append(r)
        decoded: dict[int, Decoded] = {}
        tok = self.tokenizer
        for params, members in groups.items():
            sub = ctx.select(members)
            prompt_tokens = sub.lengths().tolist()
            budget = self.engine.token_budget(sub, params)

            def stream(ids: list[list[int]], members: list[int] = members) -> None:
                for r, seq in zip(members, ids):
                    text = tok.decode(seq)
                    if not text.endswith("\ufffd"):
                        on_text(r, text)

            ids = self.engine.decode(sub, params, [batch[r].generator for r in members],
                                     stream if on_text is not None else None)
            for r, seq, n in zip(members, ids, prompt_tokens):
                decoded[r] = Decoded(tok.decode(seq), "length" if len(seq) >= budget else "stop", n, len(seq))
        return [decoded[r] for r in rows]


@dataclass
class Decoded:
    """One decoded text and how decoding ended (OpenAI's finish_reason and usage need both)."""

    raw: str
    finish_reason: str  # "stop": the model ended it; "length": the token limit did
    prompt_tokens: int
    completion_tokens: int

    def output(self) -> BagelOutput:
        """An understanding answer. A thought is split off even when none was asked for: the answer
        never carries `<think>` tags."""
        thought, answer = split_thought(self.raw)
        return BagelOutput(text=answer, thought=thought, raw_text=self.raw, finish_reason=self.finish_reason,
                           prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)

    @staticmethod
    def image_output(image: Image.Image, thought: "Decoded | str | None") -> BagelOutput:
        """A drawn image with the thought written before it (decoded now, replayed, or none)."""
        if thought is None:
            return BagelOutput(images=[image])
        if isinstance(thought, str):
            return BagelOutput(images=[image], thought=split_thought(thought)[0], raw_text=thought)
        return BagelOutput(images=[image], thought=split_thought(thought.raw)[0], raw_text=thought.raw,
                           finish_reason=thought.finish_reason, prompt_tokens=thought.prompt_tokens,
                           completion_tokens=thought.completion_tokens)


@dataclass
class _Prepared:
    req: Request
    text: str
    settings: TaskSettings
    generator: torch.Generator
    vae_image: torch.Tensor | None
    vit_image: torch.Tensor | None
    height: int | None
    width: int | None


class DrawState:
    """The contexts of a batch of image tasks (or conversations), turn after turn.

    One cache holds 2B rows: rows [0, B) are the `gen` contexts, rows [B, 2B) the `cfg_img` ones
    (only texts). `cfg_text` is forked from `gen` before each new text. Until an image or a thought
    enters `gen`, `cfg_img` equals it and its velocity is v_cond (no extra forward).
    """

    def __init__(self, pipe: BagelPipeline, batch: list[_Prepared], ctx: KVCache) -> None:
        self.pipe, self.batch, self.ctx = pipe, batch, ctx
        self.B = len(batch)
        self.img_same = [True] * self.B
        self.cfg_text: KVCache | None = None
        self.shapes = [(p.height, p.width) for p in batch]

    @classmethod
    def start(cls, pipe: BagelPipeline, batch: list[_Prepared]) -> "DrawState":
        ctx = pipe.engine.new_cache(2 * len(batch))
        sys = [pipe._system_block(p, "generation") for p in batch]
        pipe.engine.prefill_text(ctx, sys + sys)
        return cls(pipe, batch, ctx)

    def add_images(self, vae_images: list, vit_images: list, generators: list) -> None:
        """Input (or previous output) images enter `gen` as a VAE block then a ViT block."""
        eng = self.pipe.engine
        none = [None] * self.B
        if any(v is not None for v in vae_images):
            eng.prefill_vae_images(self.ctx, list(vae_images) + none, generators + none)
        if any(v is not None for v in vit_images):
            eng.prefill_vit_images(self.ctx, list(vit_images) + none)
        for b, v in enumerate(vae_images):
            if v is not None:
                self.img_same[b] = False
                self.shapes[b] = (v.shape[1], v.shape[2])

    def add_turn_text(self, texts: list[str], on_text=None, replay_thoughts: list[str | None] | None = None
                      ) -> list[Decoded | str | None]:
        """The user's text goes to gen and cfg_img; with think, the thought then goes to gen only.

        Returns each row's thought: decoded now, the replayed text, or None without think.
        `replay_thoughts` feeds previously generated thoughts instead of decoding (session restore).
        """
        eng, tok = self.pipe.engine, self.pipe.tokenizer
        self.cfg_text = self.ctx.select(list(range(self.B)))
        blocks = [tok.text_block(t) for t in texts]
        eng.prefill_text(self.ctx, blocks + blocks)
        think_rows = [b for b, p in enumerate(self.batch) if p.req.think]
        thoughts: list[Decoded | str]
        if replay_thoughts is not None:
            thoughts = [replay_thoughts[b] or "" for b in think_rows]
        else:
            thoughts = self.pipe._decode(self.ctx, self.batch, think_rows, on_text)
        out: list[Decoded | str | None] = [None] * self.B
        think_blocks: list[list[int]] = [[] for _ in range(2 * self.B)]
        for b, thought in zip(think_rows, thoughts):
            out[b] = thought
            think_blocks[b] = tok.text_block(thought if isinstance(thought, str) else thought.raw)
            self.img_same[b] = False
        if think_rows:
            eng.prefill_text(self.ctx, think_blocks)
        return out

    def generate(self, callback=None) -> list[Image.Image]:
        """Denoise one image per row (grouped by schedule) and decode them."""
        eng = self.pipe.engine
        ds = self.pipe.config.latent_downsample
        jobs = []
        for b, p in enumerate(self.batch):
            h, w = self.shapes[b]
            noise = torch.randn((h // ds) * (w // ds), self.pipe.config.patch_latent_dim, generator=p.generator)
            jobs.append(ImageJob(cond_ctx=(self.ctx, b), text_ctx=(self.cfg_text, b), img_ctx=(self.ctx, self.B + b),
                                 height=h, width=w, params=p.settings.flow, noise=noise,
                                 img_ctx_is_cond=self.img_same[b]))
        latents: list[torch.Tensor | None] = [None] * self.B
        groups: dict[tuple, list[int]] = {}
        for b, j in enumerate(jobs):
            groups.setdefault((j.params.num_timesteps, j.params.timestep_shift), []).append(b)
        for members in groups.values():
            progress = _progress_bar(self.pipe, jobs[members[0]].params.num_timesteps - 1)
            cb = _callback_adapter(self.pipe, callback, members) if callback else None
            outs = eng.generate_images([jobs[b] for b in members], callback=cb, progress=progress)
            for b, x in zip(members, outs):
                latents[b] = x
        self.last_latents = latents
        return [to_pil(eng.decode_latents(x, *self.shapes[b])) for b, x in enumerate(latents)]


# ----- helpers -------------------------------------------------------------------------------------


def _pop_callbacks(settings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("callback_on_step_end", "on_text"):
        if key in settings:
            out[key] = settings.pop(key)
    if "progress" in settings:
        settings.pop("progress")
    return out


def _callback_adapter(pipe, callback, members):
    """diffusers-style `callback_on_step_end(pipe, step, t, {"latents": [...]}) -> dict`: one latent
    tensor [tokens, channels] per image of the group; returned latents must keep those shapes."""

    def cb(step: int, t: float, xs: list[torch.Tensor]):
        result = callback(pipe, step, t, {"latents": xs})
        if not (isinstance(result, dict) and "latents" in result):
            return None
        new = result["latents"]
        if (not isinstance(new, (list, tuple)) or len(new) != len(xs)
                or any(not isinstance(n, torch.Tensor) or n.shape != x.shape for n, x in zip(new, xs))):
            shapes = [tuple(x.shape) for x in xs]
            raise InputError(f"callback_on_step_end must return latents as it got them: a list of {len(xs)} "
                             f"tensors shaped {shapes}")
        return list(new)

    return cb


def _progress_bar(pipe: BagelPipeline, total: int):
    if not pipe.progress_bar_enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, **{"desc": "denoising", "leave": False, **pipe.progress_bar_options})

    def update(done: int, total_: int) -> None:
        bar.update(done - bar.n)
        if done >= total_:
            bar.close()

    return update


def _check_text(text: Any, name: str) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"the {name} is not valid UTF-8 text") from None
    if not isinstance(text, str):
        raise InputError(f"the {name} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"the {name} is empty; write what you want")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"the {name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if "\x00" in text:
        raise InputError(f"the {name} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone UTF-16 surrogate, e.g. JSON's "\ud800"
        raise InputError(f"the {name} contains an unpaired surrogate ({text[exc.start]!a}) at character "
                         f"{exc.start}; send valid Unicode text") from None
    return text


def _check_image(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL image, got {type(image).__name__}")
    w, h = image.size
    if w < 1 or h < 1:
        raise InputError("image is empty")
    if max(w, h) / min(w, h) > 20:
        raise InputError(f"image aspect ratio {w}x{h} is more extreme than 20:1; crop it first")
    return image


def _seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (0 <= seed < 2**63):
        raise InputError(f"seed must be a non-negative integer below 2**63, got {seed!r}")
    return int(seed)  # numpy integers too


def _check_device(name: str | torch.device) -> torch.device:
    """The device, if this torch build and machine have it (a clear error instead of torch's assertion)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(device.type, lambda: True)():
        raise InputError(f"device {str(name)!r} is not available on this machine (torch {torch.__version__}); "
                         f"use {_default_device()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype {dtype} is not a float type; use torch.float32, torch.bfloat16 or torch.float16 "
                             "(for integer weights see quantize='int8')")
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU matmuls are fastest in fp32
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
