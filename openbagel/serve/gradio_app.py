"""The web app: `build_demo(pipeline)` -> gr.Blocks with Generate, Edit, Understand and Chat tabs.

Modelled on the official BAGEL app (a Thinking checkbox, hyperparameters in a collapsed accordion
with the per-task defaults) plus a Chat tab for multi-turn editing with history and undo. Every
button calls the same `BagelPipeline`; model calls share one Gradio concurrency slot, because torch
forwards must not run concurrently. Thoughts stream: each handler is a generator that yields the
text decoded so far.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from PIL import Image

from ..inference.pipeline import BagelOutput, BagelPipeline
from ..inference.session import EditSession
from ..inference.settings import resolve
from .examples import shapes_examples
from .protocol import split_partial

RATIOS = ("1:1", "4:3", "3:4", "16:9", "9:16")
RENORM_TYPES = ("global", "local", "text_channel")
MODEL_SLOT = "model"  # the one concurrency slot of every model call


def ratio_size(ratio: str, longest: int, stride: int) -> tuple[int, int]:
    """(height, width) for an aspect ratio with the longer side fixed, both multiples of `stride`."""
    w, h = (int(x) for x in ratio.split(":"))
    scale = longest / max(w, h)
    return max(stride, round(h * scale / stride) * stride), max(stride, round(w * scale / stride) * stride)


OnText = Callable[[int, str], None]


def _stream(call: Callable[[OnText], BagelOutput]) -> Iterator[tuple[str | None, BagelOutput | None]]:
    """Run `call(on_text)` on a thread; yield (text so far, None) while it decodes, then (None, output)."""
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            events.put(("done", call(lambda _row, text: events.put(("text", text)))))
        except Exception as exc:  # re-raised in the handler's thread
            events.put(("error", exc))

    threading.Thread(target=run, daemon=True).start()
    while True:
        kind, value = events.get()
        if kind == "text":
            yield value, None
        elif kind == "done":
            yield None, value
            return
        elif isinstance(value, ValueError):  # InputError, ImageLoadError, bad settings: shown in the page
            raise gr.Error(str(value))
        else:
            raise value


def _thought(out: BagelOutput) -> str:
    return out.thought if out.thought is not None else (out.raw_text or "")


class _Controls:
    """The advanced settings of one tab, and their mapping onto pipeline settings."""

    def __init__(self, pipe: BagelPipeline, task: str) -> None:
        s = resolve(task, {}, pipe.config.task_defaults)
        self.components: list[gr.components.Component] = []
        self.names: list[str] = []
        with gr.Accordion("Advanced settings", open=False):
            self.seed = gr.Number(0, label="Seed", info="0 = random", precision=0, minimum=0)
            if task == "generate":
                self.ratio = gr.Dropdown(RATIOS, value="1:1", label="Aspect ratio", info="longer side fixed")
            if s.flow is not None:
                f = s.flow
                with gr.Row():
                    self._add("cfg_text_scale", gr.Slider(1.0, 8.0, f.cfg_text_scale, step=0.1, label="Text guidance"))
                    if task == "edit":
                        self._add("cfg_img_scale", gr.Slider(1.0, 4.0, f.cfg_img_scale, step=0.1,
                                                             label="Image guidance"))
                    self._add("cfg_interval", gr.Slider(0.0, 1.0, f.cfg_interval[0], step=0.05,
                                                        label="Guidance interval start"))
                with gr.Row():
                    self._add("cfg_renorm_type", gr.Dropdown(RENORM_TYPES, value=f.cfg_renorm_type,
                                                             label="Renorm type"))
                    self._add("cfg_renorm_min", gr.Slider(0.0, 1.0, f.cfg_renorm_min, step=0.05, label="Renorm min"))
                with gr.Row():
                    self._add("num_inference_steps", gr.Slider(2, 100, f.num_timesteps, step=1, label="Steps"))
                    self._add("timestep_shift", gr.Slider(1.0, 5.0, f.timestep_shift, step=0.5, label="Shift"))
            t = s.text
            with gr.Row():
                self._add("do_sample", gr.Checkbox(t.do_sample, label="Sampling (thinking and answers)"))
                self._add("max_think_token_n", gr.Slider(16, 4096, t.max_new_tokens, step=16,
                                                         label="Max think / answer tokens"))
                self._add("temperature", gr.Slider(0.1, 1.0, t.temperature, step=0.05, label="Temperature"))

    def _add(self, name: str, component: gr.components.Component) -> None:
        self.names.append(name)
        self.components.append(component)

    def settings(self, values: tuple) -> dict[str, Any]:
        out = dict(zip(self.names, values, strict=True))
        if "cfg_interval" in out:
            out["cfg_interval"] = (float(out["cfg_interval"]), 1.0)
        for key in ("num_inference_steps", "max_think_token_n"):
            if key in out:
                out[key] = int(out[key])
        return out


def _seed(value: float | None) -> int | None:
    return int(value) if value else None  # 0 = random, as in the official app


def build_demo(pipe: BagelPipeline) -> gr.Blocks:
    """The app around one loaded pipeline. Launch with `.queue().launch(server_name="127.0.0.1")`."""
    pipe.set_progress_bar_config(disable=True)
    longest, stride = max(pipe.config.default_image_size), pipe.config.latent_downsample

    with gr.Blocks(title="openbagel") as demo:
        gr.Markdown("# openbagel\nDraw from text, edit images, ask questions, and edit over several turns. "
                    "Tick **Thinking** to let the model reason first; its thought streams in as it is written.")

        # ----- Generate ------------------------------------------------------------------------------
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", placeholder="a red circle left of a blue square", lines=2,
                                        elem_id="generate-prompt")
                    think = gr.Checkbox(False, label="Thinking")
                    button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    controls = _Controls(pipe, "generate")
                    gr.Examples([[e.text] for e in shapes_examples("generate")], inputs=[prompt])
                with gr.Column():
                    thought = gr.Textbox(label="Thinking process", visible=False, lines=4)
                    image = gr.Image(label="Result", type="pil", format="png", height=384, elem_id="generate-image")

            def generate(prompt: str, think: bool, seed: float, ratio: str, *values: Any):
                height, width = ratio_size(ratio, longest, stride)
                for text, out in _stream(lambda on_text: pipe.generate(
                        prompt, think=think, height=height, width=width, seed=_seed(seed), on_text=on_text,
                        **controls.settings(values))):
                    yield (gr.update(), split_partial(text)[0]) if out is None else (out.images[0], _thought(out))

            think.change(lambda t: gr.update(visible=t), think, thought)
            gr.on([button.click, prompt.submit], generate,
                  [prompt, think, controls.seed, controls.ratio, *controls.components], [image, thought],
                  concurrency_id=MODEL_SLOT, concurrency_limit=1)

        # ----- Edit ----------------------------------------------------------------------------------
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(label="Image to edit", type="pil", format="png", height=256,
                                      elem_id="edit-source")
                    instruction = gr.Textbox(label="Instruction", placeholder="make the circle green", lines=2)
                    edit_think = gr.Checkbox(False, label="Thinking")
                    edit_button = gr.Button("Edit", variant="primary")
                    edit_controls = _Controls(pipe, "edit")
                    examples = shapes_examples("edit") + shapes_examples("reason_edit", 2)
                    gr.Examples([[e.image, e.text] for e in examples], inputs=[source, instruction])
                with gr.Column():
                    edit_thought = gr.Textbox(label="Thinking process", visible=False, lines=4)
                    edited = gr.Image(label="Result", type="pil", format="png", height=384, elem_id="edit-image")

            def edit(image: Image.Image | None, instruction: str, think: bool, seed: float, *values: Any):
                if image is None:
                    raise gr.Error("upload an image to edit first")
                for text, out in _stream(lambda on_text: pipe.edit(
                        image, instruction, think=think, seed=_seed(seed), on_text=on_text,
                        **edit_controls.settings(values))):
                    yield (gr.update(), split_partial(text)[0]) if out is None else (out.images[0], _thought(out))

            edit_think.change(lambda t: gr.update(visible=t), edit_think, edit_thought)
            gr.on([edit_button.click, instruction.submit], edit,
                  [source, instruction, edit_think, edit_controls.seed, *edit_controls.components],
                  [edited, edit_thought], concurrency_id=MODEL_SLOT, concurrency_limit=1)

        # ----- Understand ----------------------------------------------------------------------------
        with gr.Tab("Understand", id="understand"):
            with gr.Row():
                with gr.Column():
                    picture = gr.Image(label="Image (optional)", type="pil", format="png", height=256,
                                       elem_id="understand-source")
                    question = gr.Textbox(label="Question", placeholder="what color is the square?", lines=2)
                    ask_think = gr.Checkbox(False, label="Thinking")
                    ask_button = gr.Button("Ask", variant="primary")
                    ask_controls = _Controls(pipe, "understand")
                    gr.Examples([[e.image, e.text] for e in shapes_examples("question")
                                 + shapes_examples("reason_question", 2)], inputs=[picture, question])
                with gr.Column():
                    ask_thought = gr.Textbox(label="Thinking process", visible=False, lines=4)
                    answer = gr.Textbox(label="Answer", lines=4, elem_id="understand-answer")

            def understand(image: Image.Image | None, question: str, think: bool, seed: float, *values: Any):
                for text, out in _stream(lambda on_text: pipe.understand(
                        image, question, think=think, seed=_seed(seed), on_text=on_text,
                        **ask_controls.settings(values))):
                    yield split_partial(text)[::-1] if out is None else (out.text, out.thought or "")

            ask_think.change(lambda t: gr.update(visible=t), ask_think, ask_thought)
            gr.on([ask_button.click, question.submit], understand,
                  [picture, question, ask_think, ask_controls.seed, *ask_controls.components], [answer, ask_thought],
                  concurrency_id=MODEL_SLOT, concurrency_limit=1)

        # ----- Chat (multi-turn editing) ---------------------------------------------------------------
        with gr.Tab("Chat", id="chat"):
            session = gr.State(None)
            with gr.Row():
                with gr.Column():
                    start = gr.Image(label="Starting image", type="pil", format="png", height=256,
                                     elem_id="chat-source")
                    turn = gr.Textbox(label="Instruction", placeholder="each instruction edits the latest image",
                                      lines=2)
                    chat_think = gr.Checkbox(False, label="Thinking", info="set when a session starts")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary")
                        undo = gr.Button("Undo")
                        reset = gr.Button("New session")
                    chat_controls = _Controls(pipe, "edit")
                    gr.Examples([[e.image, e.text] for e in shapes_examples("edit", 2, seed=1)], inputs=[start, turn])
                with gr.Column():
                    chat_thought = gr.Textbox(label="Thinking process", visible=False, lines=4)
                    latest = gr.Image(label="Latest image", type="pil", format="png", height=384, elem_id="chat-image")
                    history = gr.Gallery(label="History", columns=4, height="auto")

            def gallery(s: EditSession | None) -> list:
                if s is None:
                    return []
                turns = [(t.image, f"{k + 1}. {t.instruction}") for k, t in enumerate(s.turns)]
                return [(s.source, "0. start"), *turns]

            def chat(image: Image.Image | None, instruction: str, think: bool, s: EditSession | None, seed: float,
                     *values: Any):
                if s is None:
                    if image is None:
                        raise gr.Error("upload a starting image first")
                    s = pipe.session(image, think=think, seed=_seed(seed) or 0, **chat_controls.settings(values))
                for text, out in _stream(lambda on_text: s.edit(instruction, on_text=on_text)):
                    if out is None:
                        yield gr.update(), gr.update(), split_partial(text)[0], s, gr.update()
                    else:
                        yield out.images[0], gallery(s), _thought(out), s, ""

            def undo_turn(s: EditSession | None):
                if s is None or not s.turns:
                    raise gr.Error("nothing to undo")
                s.undo()
                return s.image, gallery(s), s

            chat_think.change(lambda t: gr.update(visible=t), chat_think, chat_thought)
            gr.on([send.click, turn.submit], chat,
                  [start, turn, chat_think, session, chat_controls.seed, *chat_controls.components],
                  [latest, history, chat_thought, session, turn], concurrency_id=MODEL_SLOT, concurrency_limit=1)
            undo.click(undo_turn, [session], [latest, history, session], concurrency_id=MODEL_SLOT)
            reset.click(lambda: (None, None, []), None, [session, latest, history])
            start.upload(lambda: (None, None, []), None, [session, latest, history])

    return demo
