"""Bad input, one case per test: each must end in a specific, clear error and never in a crash.

Covers the library (images, prompts, sizes, settings), batch files, checkpoints, the command line (real
subprocesses: one `error:` line, non-zero exit, no traceback) and the HTTP server (in-process ASGI
client: a 4xx OpenAI error object, never a 500). Valid but unusual images (1x1, 16-bit, palette, CMYK,
grayscale, RGBA...) must work. Everything runs on the tiny random checkpoint with tiny settings.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from openbagel.checkpoint import CheckpointError, load_checkpoint
from openbagel.inference.batch import parse_line, run_batch_file
from openbagel.inference.pipeline import InputError
from openbagel.processing import ImageLoadError, open_image

FAST = {"num_inference_steps": 3}

# ----- image files -----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature IHDR chunk claiming width x height, and 64 bytes of pixel data.

    Decoding it would fail as a truncated file; refusing it for its size proves that the size was
    checked from the header, before decoding.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


SCENE = encode(Image.new("RGB", (64, 64), (240, 240, 240)))

BAD_IMAGE_BYTES = {
    "zero-byte": (b"", "empty (0 bytes)"),
    "truncated-png": (SCENE[: len(SCENE) // 2], "not a readable image"),
    "truncated-jpeg": (encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300], "truncated file"),
    "random-bytes": (bytes(range(256)) * 8, "unknown or corrupt format"),
    "text-named-png": (b"hello, I am a text file", "not a readable image"),
    "html-named-jpg": (b"<html><body>not an image</body></html>", "not a readable image"),
    "bomb-100000x100000": (png_header_only(100_000, 100_000), "decompression bomb"),
    "over-pixel-limit-9000x9000": (png_header_only(9000, 9000), "over the limit of"),
}


@pytest.mark.parametrize("name", BAD_IMAGE_BYTES)
def test_bad_image_files_are_refused(name, tmp_path):
    data, message = BAD_IMAGE_BYTES[name]
    path = tmp_path / ("image.jpg" if "jpg" in name or "jpeg" in name else "image.png")
    path.write_bytes(data)
    for source in (path, data):  # a file on disk and an upload in memory
        with pytest.raises(ImageLoadError, match=re.escape(message)):
            open_image(source)


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageLoadError, match=re.escape("does not exist or is not a file")):
        open_image(tmp_path / "nothing.png")


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.info["transparency"] = 0
    return image


VALID_IMAGES = {
    "1x1": lambda: Image.new("RGB", (1, 1), (255, 0, 0)),
    "16-bit-gray": lambda: Image.new("I;16", (48, 32), 40000),
    "palette": lambda: Image.new("RGB", (48, 32), (0, 128, 255)).convert("P"),
    "palette-transparent": _palette_with_transparency,
    "cmyk-jpeg": lambda: Image.new("CMYK", (48, 32), (0, 255, 255, 0)),
    "grayscale": lambda: Image.new("L", (48, 32), 128),
    "gray-alpha": lambda: Image.new("LA", (48, 32), (128, 100)),
    "rgba": lambda: Image.new("RGBA", (48, 32), (255, 0, 0, 128)),
    "1-bit": lambda: Image.new("1", (48, 32), 1),
    "20-to-1": lambda: Image.new("RGB", (400, 20), (0, 0, 0)),
}


@pytest.mark.parametrize("name", VALID_IMAGES)
def test_valid_image_modes_work(name, tiny_pipeline):
    original = VALID_IMAGES[name]()
    data = encode(original, "JPEG" if original.mode == "CMYK" else "PNG")
    image = open_image(data)
    assert image.mode == "RGB" and image.size == original.size
    out = tiny_pipeline.understand(image, "what color is it?", max_new_tokens=2)
    assert isinstance(out.text, str)


def test_rgba_is_composited_on_white():
    image = open_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert image.getpixel((0, 0)) == (255, 255, 255)


# ----- pipeline inputs -------------------------------------------------------------------------------

TALL = Image.new("RGB", (10, 2000))

# (method, args, keyword arguments, words the error must contain)
BAD_CALLS = {
    "extreme-aspect-ratio": ("understand", (TALL, "what?"), {}, "more extreme than 20:1"),
    "image-not-pil": ("edit", ("scene.png", "make it red"), {}, "image must be a PIL image, got str"),
    "edit-without-image": ("edit", (None, "make it red"), {}, "edit needs an input image"),
    "empty-prompt": ("generate", ("",), {}, "the prompt is empty"),
    "whitespace-prompt": ("generate", (" \n\t  ",), {}, "the prompt is empty"),
    "very-long-prompt": ("generate", ("x" * 32_001,), {}, "32001 characters; the limit is 32000"),
    "non-utf8-prompt": ("generate", (b"\xff\xfe red circle",), {}, "not valid UTF-8"),
    "nul-in-prompt": ("generate", ("a red\x00circle",), {}, "contains a NUL character"),
    "lone-surrogate": ("generate", ("a red \ud800 circle",), {}, "unpaired surrogate ('\\ud800') at character 6"),
    "prompt-not-a-string": ("generate", (42,), {}, "must be a string, got int"),
    "empty-question": ("understand", (None, "   "), {}, "the question is empty"),
    "size-not-multiple-of-stride": ("generate", ("x",), {"height": 65}, "multiple of 16 between 16 and 256, got 65"),
    "size-zero": ("generate", ("x",), {"width": 0}, "multiple of 16 between 16 and 256, got 0"),
    "size-negative": ("generate", ("x",), {"height": -16}, "got -16"),
    "size-over-max": ("generate", ("x",), {"width": 272}, "between 16 and 256, got 272"),
    "size-float": ("generate", ("x",), {"height": 64.0}, "must be an integer number of pixels"),
    "steps-negative": ("generate", ("x",), {"num_inference_steps": -1}, "from 2 to 1000, got -1"),
    "steps-zero": ("generate", ("x",), {"num_inference_steps": 0}, "from 2 to 1000, got 0"),
    "steps-huge": ("generate", ("x",), {"num_inference_steps": 10**9}, "from 2 to 1000"),
    "steps-fraction": ("generate", ("x",), {"num_inference_steps": 2.5}, "must be an integer, got 2.5"),
    "steps-nan": ("generate", ("x",), {"num_inference_steps": float("nan")}, "must be finite, got nan"),
    "guidance-negative": ("generate", ("x",), {"guidance_scale": -1.0}, "guidance_scale) must be a number in [0, 100]"),
    "guidance-huge": ("generate", ("x",), {"guidance_scale": 1e300}, "must be a number in [0, 100]"),
    "guidance-inf": ("generate", ("x",), {"guidance_scale": float("inf")}, "cfg_text_scale must be finite"),
    "image-guidance-nan": ("edit", (Image.new("RGB", (64, 64)), "x"), {"image_guidance_scale": float("nan")},
                           "cfg_img_scale must be finite"),
    "shift-minus-inf": ("generate", ("x",), {"timestep_shift": float("-inf")}, "timestep_shift must be finite"),
    "shift-zero": ("generate", ("x",), {"timestep_shift": 0}, "timestep_shift must be a number in (0, 100]"),
    "cfg-interval-reversed": ("generate", ("x",), {"cfg_interval": (0.9, 0.1)}, "0 <= start <= end <= 1"),
    "cfg-interval-nan": ("generate", ("x",), {"cfg_interval": (0.0, float("nan"))}, "bound must be finite"),
    "cfg-interval-one-number": ("generate", ("x",), {"cfg_interval": 0.4}, "two numbers [start, end]"),
    "renorm-type-unknown": ("generate", ("x",), {"cfg_renorm_type": "local"}, "cfg_renorm_type must be one of"),
    "renorm-min-above-one": ("generate", ("x",), {"cfg_renorm_min": 2.0}, "cfg_renorm_min must be a number in [0, 1]"),
    "unknown-setting": ("generate", ("x",), {"strength": 0.5}, "unknown setting 'strength' for generate"),
    "max-tokens-zero": ("understand", (None, "why?"), {"max_new_tokens": 0}, "from 1 to 100000, got 0"),
    "temperature-zero": ("understand", (None, "why?"), {"temperature": 0}, "temperature must be a number in (0, 100]"),
    "top-p-zero": ("understand", (None, "why?"), {"top_p": 0.0}, "top_p must be a number in (0, 1]"),
    "do-sample-string": ("understand", (None, "why?"), {"do_sample": "yes"}, "do_sample must be true or false"),
    "seed-negative": ("generate", ("x",), {"seed": -1}, "seed must be a non-negative integer"),
    "seed-bool": ("generate", ("x",), {"seed": True}, "seed must be a non-negative integer"),
    "seed-and-generator": ("generate", ("x",), {"seed": 1, "generator": torch.Generator()},
                           "give seed or generator, not both"),
    "generator-not-a-generator": ("generate", ("x",), {"generator": 3}, "generator must be a torch.Generator, got int"),
    "think-not-a-bool": ("generate", ("x",), {"think": "yes"}, "think must be True or False, got 'yes'"),
    "several-images-per-prompt": ("generate", ("x",), {"num_images_per_prompt": 2}, "one image per call"),
    "callback-tensor-inputs": ("generate", ("x",), {"callback_on_step_end_tensor_inputs": ["prompt_embeds"]},
                               "only 'latents' is offered"),
    "callback-not-callable": ("generate", ("x",), {"callback_on_step_end": "x"}, "must be callable, got str"),
    "understand-bad-image-setting": ("understand", (None, "why?"), {"cfg_renorm_type": "foo"},
                                     "cfg_renorm_type must be one of"),
    "prompt-over-the-context": ("generate", ("x " * 4000,), {}, "this model reads at most 3584"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_pipeline_calls(name, tiny_pipeline):
    method, args, kwargs, message = BAD_CALLS[name]
    with pytest.raises(InputError) as exc:
        getattr(tiny_pipeline, method)(*args, **kwargs)
    assert message in str(exc.value)


def test_bad_sessions_and_requests(tiny_pipeline, tmp_path):
    import numpy as np

    from openbagel import EditSession

    with pytest.raises(InputError, match="image must be a PIL image, got ndarray"):
        tiny_pipeline.session(np.zeros((64, 64, 3), dtype=np.uint8))
    session = tiny_pipeline.session(Image.new("RGB", (64, 64)), num_inference_steps=2)
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        session.edit("make it red", seed=-1)
    assert tiny_pipeline.session(Image.new("RGB", (64, 64)), seed=2**63 - 1, num_inference_steps=2).edit("x").images
    with pytest.raises(InputError, match=re.escape("run takes a list of openbagel.Request objects")):
        tiny_pipeline.run([{"task": "generate", "text": "x"}])
    with pytest.raises(InputError, match="not a float type"):
        type(tiny_pipeline).from_pretrained(tmp_path, dtype=torch.int8)
    session.edit("make it red")
    session.save(tmp_path / "saved")
    (tmp_path / "saved" / "turn_01.png").unlink()
    with pytest.raises(InputError, match="is not a saved session"):
        EditSession.load(tiny_pipeline, tmp_path / "saved")
    (tmp_path / "saved" / "session.json").write_text('{"version": 1}')
    with pytest.raises(InputError, match="is not a saved session \\(missing field 'turns'\\)"):
        EditSession.load(tiny_pipeline, tmp_path / "saved")


def test_unknown_task_kind(tiny_pipeline):
    from openbagel.inference.pipeline import Request

    with pytest.raises(InputError, match=re.escape("unknown task 'paint'; use generate, edit or understand")):
        tiny_pipeline.run([Request("paint", "a circle")])


def test_generate_refuses_an_input_image(tiny_pipeline):
    from openbagel.inference.pipeline import Request

    with pytest.raises(InputError, match=re.escape("generate takes no input image; use edit")):
        tiny_pipeline.run([Request("generate", "a circle", Image.new("RGB", (64, 64)))])


# ----- batch files -----------------------------------------------------------------------------------

BAD_LINES = {
    "not-json": ("{not json", "line 1 is not valid JSON"),
    "json-array": ('["generate", "x"]', "line 1 must be a JSON object"),
    "missing-id": ('{"task": "generate", "prompt": "x"}', "missing field 'id'"),
    "empty-id": ('{"id": "", "task": "generate", "prompt": "x"}', "'id' is ''; it must be a non-empty string"),
    "number-id": ('{"id": 5, "task": "generate", "prompt": "x"}', "'id' is 5; it must be a non-empty string"),
    "unknown-kind": ('{"id": "a", "task": "paint", "prompt": "x"}', "unknown task 'paint'"),
    "missing-kind": ('{"id": "a", "prompt": "x"}', "unknown task None"),
    "generate-without-prompt": ('{"id": "a", "task": "generate"}', "generate task needs the field 'prompt'"),
    "edit-without-image": ('{"id": "a", "task": "edit", "instruction": "x"}', "edit task needs the field 'image'"),
    "understand-without-question": ('{"id": "a", "task": "understand", "image": "ok.png"}',
                                    "understand task needs the field 'question'"),
    "chat-without-turns": ('{"id": "a", "task": "chat", "image": "ok.png"}', "chat task needs the field 'turns'"),
    "chat-empty-turns": ('{"id": "a", "task": "chat", "image": "ok.png", "turns": []}', "non-empty list"),
    "chat-too-many-turns": (json.dumps({"id": "a", "task": "chat", "image": "ok.png", "turns": ["x"] * 21}),
                            "the limit is 20"),
    "prompt-not-string": ('{"id": "a", "task": "generate", "prompt": 5}', "'prompt' must be a string"),
    "think-not-bool": ('{"id": "a", "task": "generate", "prompt": "x", "think": "yes"}', "'think' must be true or"),
    "seed-negative": ('{"id": "a", "task": "generate", "prompt": "x", "seed": -3}', "'seed' must be a non-negative"),
    "image-absolute": ('{"id": "a", "task": "edit", "instruction": "x", "image": "/etc/passwd"}',
                       "must be relative to the task file's folder"),
    "image-dotdot": ('{"id": "a", "task": "edit", "instruction": "x", "image": "../outside.png"}',
                     "leaves the task file's folder"),
    "image-dotdot-inside-path": ('{"id": "a", "task": "edit", "instruction": "x", "image": "sub/../../outside.png"}',
                                 "leaves the task file's folder"),
    "image-symlink-out": ('{"id": "a", "task": "edit", "instruction": "x", "image": "link.png"}',
                          "leaves the task file's folder"),
    "image-not-a-string": ('{"id": "a", "task": "edit", "instruction": "x", "image": ["ok.png"]}',
                           "'image' must be a relative path"),
    "image-missing": ('{"id": "a", "task": "edit", "instruction": "x", "image": "missing.png"}', "does not exist"),
    "image-is-text": ('{"id": "a", "task": "edit", "instruction": "x", "image": "notes.png"}', "not a readable image"),
}


@pytest.fixture
def task_folder(tmp_path) -> Path:
    """tasks/ with a good image, a text file named .png, and a symlink to an image outside the folder."""
    folder = tmp_path / "tasks"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.png").write_bytes(SCENE)
    (folder / "notes.png").write_text("not an image")
    (tmp_path / "outside.png").write_bytes(SCENE)
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    return folder


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_batch_lines(name, task_folder):
    line, message = BAD_LINES[name]
    task = parse_line(0, line, task_folder, set())
    assert task.error is not None and message in task.error


def test_duplicate_batch_id(task_folder):
    seen: set[str] = set()
    line = '{"id": "a", "task": "generate", "prompt": "x"}'
    assert parse_line(0, line, task_folder, seen).error is None
    assert parse_line(1, line, task_folder, seen).error == "duplicate id 'a'"


def test_batch_file_isolates_bad_lines(tiny_pipeline, task_folder, tmp_path):
    """Bad lines (including ones only the pipeline can judge) report errors; the good ones still run."""
    lines = ['{"id": "good", "task": "generate", "prompt": "a red circle"}',
             '{"id": "empty", "task": "generate", "prompt": "   "}',
             BAD_LINES["image-dotdot"][0].replace('"a"', '"escape"'),
             '{"id": "question", "task": "understand", "image": "ok.png", "question": "what?"}']
    (task_folder / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    results = run_batch_file(tiny_pipeline, task_folder / "tasks.jsonl", tmp_path / "out",
                             settings={**FAST, "max_new_tokens": 2})
    by_id = {r["id"]: r for r in results}
    assert "error" not in by_id["good"] and (tmp_path / "out" / by_id["good"]["image"]).is_file()
    assert "error" not in by_id["question"] and isinstance(by_id["question"]["text"], str)
    assert by_id["empty"]["error"] == "the prompt is empty; write what you want"
    assert "leaves the task file's folder" in by_id["escape"]["error"]
    assert not (tmp_path / "outside.png").read_bytes() != SCENE  # nothing outside was touched


def test_batch_file_with_a_bom_and_bad_max_batch(tiny_pipeline, tmp_path):
    """Windows editors start UTF-8 files with a BOM: the first task keeps its id and runs."""
    line = json.dumps({"id": "first", "task": "understand", "image": "ok.png", "question": "what?"})
    (tmp_path / "ok.png").write_bytes(SCENE)
    (tmp_path / "tasks.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n")
    results = run_batch_file(tiny_pipeline, tmp_path / "tasks.jsonl", tmp_path / "out", settings={"max_new_tokens": 2})
    assert results[0]["id"] == "first" and "error" not in results[0] and "text" in results[0]
    with pytest.raises(InputError, match="max_batch must be a whole number of at least 1"):
        run_batch_file(tiny_pipeline, tmp_path / "tasks.jsonl", tmp_path / "out", max_batch=0)


def test_unavailable_device_is_named(tiny_checkpoint):
    from openbagel.inference.pipeline import BagelPipeline

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device 'cuda' is not available on this machine"):
            BagelPipeline.from_pretrained(tiny_checkpoint, device="cuda")
    with pytest.raises(InputError, match="unknown device 'tpu9'"):
        BagelPipeline.from_pretrained(tiny_checkpoint, device="tpu9")


def test_batch_file_not_utf8(tiny_pipeline, tmp_path):
    (tmp_path / "tasks.jsonl").write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(InputError, match=re.escape("cannot read task file")):
        run_batch_file(tiny_pipeline, tmp_path / "tasks.jsonl", tmp_path / "out")


# ----- checkpoints -----------------------------------------------------------------------------------


class CreatesMarker:
    """Unpickling this object creates the file `path`: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _drop_one_tensor(d: Path) -> None:
    tensors = load_file(d / "ema.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, d / "ema.safetensors")


def _reshape_one_tensor(d: Path) -> None:
    tensors = load_file(d / "ema.safetensors")
    key = next(k for k, v in sorted(tensors.items()) if v.ndim == 2)
    tensors[key] = tensors[key].reshape(-1).contiguous()
    save_file(tensors, d / "ema.safetensors")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_as_safetensors(d: Path) -> None:
    (d / "ema.safetensors").write_bytes(pickle.dumps(CreatesMarker(d / "UNPICKLED")))


def _pickle_weights_only(d: Path) -> None:
    (d / "ema.safetensors").unlink()
    (d / "ema.pt").write_bytes(pickle.dumps(CreatesMarker(d / "UNPICKLED")))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(CreatesMarker(d / "UNPICKLED")))


def _index_naming_missing_shard(d: Path) -> None:
    (d / "ema.safetensors").rename(d / "ema-00001-of-00002.safetensors")
    (d / "ema.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "ema-00001-of-00002.safetensors", "b": "ema-00002-of-00002.safetensors"}}))


def _broken_index(d: Path) -> None:
    (d / "ema.safetensors").unlink()
    (d / "ema.safetensors.index.json").write_text("{broken")


def _rewrite_header(path: Path, change) -> None:
    """Edit the first two entries of a safetensors header in place (same length: the data stays put)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    first, second = [header[k] for k in header if k != "__metadata__"][:2]
    change(first, second)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])


def _overlap(first: dict, second: dict) -> None:
    """The second tensor claims the first one's bytes (a consistent entry, only the overlap is wrong)."""
    second.update(dtype=first["dtype"], shape=first["shape"], data_offsets=first["data_offsets"])


BROKEN_CHECKPOINTS = {
    "missing-weights": (lambda d: (d / "ema.safetensors").unlink(), "has no ema.safetensors"),
    "missing-vae": (lambda d: (d / "ae.safetensors").unlink(), "has no ae.safetensors"),
    "missing-llm-config": (lambda d: (d / "llm_config.json").unlink(), "llm_config.json is missing"),
    "missing-tensor": (_drop_one_tensor, "does not match the config: missing:"),
    "wrong-shape": (_reshape_one_tensor, "wrong shape:"),
    "truncated-weights": (lambda d: _truncate(d / "ema.safetensors"), "is truncated"),
    "truncated-vae": (lambda d: _truncate(d / "ae.safetensors"), "is truncated"),
    "zero-byte-weights": (lambda d: (d / "ema.safetensors").write_bytes(b""), "truncated or not safetensors"),
    "pickle-named-safetensors": (_pickle_as_safetensors, "not a safetensors file"),
    "only-pickle-weights": (_pickle_weights_only, "holds pickle weights (.bin/.pt); only safetensors are loaded"),
    "index-names-missing-shard": (_index_naming_missing_shard, "names shards that are missing"),
    "broken-index": (_broken_index, "is not a safetensors index"),
    "unknown-dtype": (lambda d: _rewrite_header(d / "ema.safetensors", lambda e, _: e.update(dtype="C64")),
                      "unsupported tensor dtype"),
    "header-without-offsets": (lambda d: _rewrite_header(d / "ema.safetensors", lambda e, _: e.pop("data_offsets")),
                               "its header is malformed"),
    "byte-count-off-shape": (lambda d: _rewrite_header(d / "ema.safetensors",
                                                       lambda e, _: e["data_offsets"].__setitem__(1, e["data_offsets"][1] - 4)),
                             "its header is malformed"),
    "negative-offset": (lambda d: _rewrite_header(d / "ema.safetensors",
                                                  lambda e, _: e.update(data_offsets=[-8, e["data_offsets"][1] - 8])),
                        "its header is malformed"),
    "overlapping-tensors": (lambda d: _rewrite_header(d / "ema.safetensors", _overlap), "tensors overlap"),
}


@pytest.mark.parametrize("name", BROKEN_CHECKPOINTS)
def test_broken_checkpoints(name, tiny_checkpoint, tmp_path):
    breaks, message = BROKEN_CHECKPOINTS[name]
    directory = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    breaks(directory)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(directory)
    assert message in str(exc.value)
    assert not (directory / "UNPICKLED").exists(), "a pickle was unpickled"


def test_checkpoint_path_is_a_file(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=re.escape("is a file; pass the checkpoint directory")):
        load_checkpoint(tiny_checkpoint / "ema.safetensors")


def test_checkpoint_path_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape("neither a local directory nor a hub id")):
        load_checkpoint(tmp_path / "no" / "such" / "folder")


def test_marker_pickle_really_creates_the_marker(tmp_path):
    """Guard for the tests above: unpickling the payload does create the file."""
    pickle.loads(pickle.dumps(CreatesMarker(tmp_path / "UNPICKLED")))
    assert (tmp_path / "UNPICKLED").exists()


# ----- the command line (real processes) -------------------------------------------------------------

CLI_CASES = {
    "edit-missing-file": (["edit", "{tmp}/missing.png", "make it red"], 1, "does not exist or is not a file"),
    "understand-text-file": (["understand", "{tmp}/notes.png", "what?"], 1, "notes.png is not a readable image"),
    "edit-decompression-bomb": (["edit", "{tmp}/bomb.png", "make it red"], 1, "decompression bomb"),
    "generate-nan-guidance": (["generate", "x", "--model", "{ckpt}", "--guidance-scale", "nan", "--out", "{tmp}/g.png"],
                              1, "cfg_text_scale must be finite"),
    "generate-size-not-a-size": (["generate", "x", "--size", "big"], 2, "size must look like '512x512'"),
    "pickle-checkpoint": (["generate", "x", "--model", "{tmp}/pickled"], 1, "only safetensors are loaded"),
    "unknown-device": (["generate", "x", "--model", "{ckpt}", "--device", "tpu9"], 1, "unknown device 'tpu9'"),
    "port-out-of-range": (["serve", "--port", "99999"], 2, "a port is a number from 1 to 65535"),
    "out-not-an-image-name": (["generate", "x", "--out", "{tmp}/outdir/"], 2, "is not an image file name"),
    "max-batch-zero": (["batch", "{tmp}/notes.png", "--out", "{tmp}/r", "--max-batch", "0"], 2, "at least 1"),
    "batch-bad-flag-before-loading": (["batch", "{tmp}/notes.png", "--out", "{tmp}/r", "--steps", "0"], 1,
                                      "num_inference_steps must be an integer from 2"),
}


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_errors_are_one_line(name, tiny_checkpoint, tmp_path):
    argv, code, message = CLI_CASES[name]
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    pickled = Path(shutil.copytree(tiny_checkpoint, tmp_path / "pickled"))
    _pickle_weights_only(pickled)
    argv = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint) for a in argv]
    result = subprocess.run([sys.executable, "-m", "openbagel", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == code
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (pickled / "UNPICKLED").exists()


# ----- the server (in-process) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tiny_pipeline, tmp_path_factory):
    from fastapi.testclient import TestClient

    from openbagel.serve.server import create_app

    app = create_app(tiny_pipeline, sessions_db=tmp_path_factory.mktemp("db") / "sessions.sqlite3")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def upload(data: bytes) -> dict:
    return {"files": {"image": ("image.png", data, "image/png")}, "data": {"prompt": "make it red", **FAST}}


SERVER_CASES = {
    "edit-zero-byte-upload": ("/v1/images/edits", upload(b""), "empty (0 bytes)"),
    "edit-truncated-upload": ("/v1/images/edits", upload(SCENE[:100]), "not a readable image"),
    "edit-bomb-upload": ("/v1/images/edits", upload(png_header_only(100_000, 100_000)), "decompression bomb"),
    "edit-extreme-aspect": ("/v1/images/edits", upload(encode(Image.new("RGB", (2000, 10)))), "20:1"),
    "edit-mask-wrong-size": ("/v1/images/edits", {"files": {
        "image": ("a.png", SCENE, "image/png"), "mask": ("m.png", encode(Image.new("RGBA", (8, 8))), "image/png")},
        "data": {"prompt": "x"}}, "the mask is 8x8 but the image is 64x64"),
    "generation-size-over-max": ("/v1/images/generations", {"json": {"prompt": "x", "size": "4096x4096"}},
                                 "between 16 and 256, got 4096"),
    "generation-size-zero": ("/v1/images/generations", {"json": {"prompt": "x", "size": "0x0"}}, "got 0"),
    "generation-huge-steps": ("/v1/images/generations", {"json": {"prompt": "x", "num_inference_steps": 10**12}},
                              "from 2 to 1000"),
    "generation-nan-guidance": ("/v1/images/generations", {
        "content": b'{"prompt": "x", "guidance_scale": NaN}', "headers": {"Content-Type": "application/json"}},
        "must be finite"),
    "generation-non-utf8-body": ("/v1/images/generations", {
        "content": b'{"prompt": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}},
        "error parsing the body"),
    "generation-prompt-missing": ("/v1/images/generations", {"json": {"n": 1}}, "prompt: Field required"),
    "chat-no-user-message": ("/v1/chat/completions", {"json": {"messages": [{"role": "system", "content": "hi"}]}},
                             "no user message"),
    "chat-file-url": ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "?"}]}]}},
        "an image must be a data URL"),
    "chat-image-not-an-image": ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"GIF89a nonsense")}}, {"type": "text", "text": "?"}]}]}},
        "not a readable image"),
    "session-image-truncated": ("/v1/sessions", {"json": {"image": data_url(SCENE[:50])}}, "not a readable image"),
}


@pytest.mark.parametrize("name", SERVER_CASES)
def test_bad_requests_get_a_4xx_error_object(name, api):
    path, request, message = SERVER_CASES[name]
    response = api.post(path, **request)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]


def test_server_still_serves_after_bad_requests(api):
    response = api.post("/v1/images/generations", json={"prompt": "a red circle", "size": "32x32", **FAST})
    assert response.status_code == 200 and len(response.json()["data"]) == 1


def test_cli_batch_where_no_task_ran_fails(tiny_checkpoint, tmp_path):
    """Failed tasks are reported one per line; a file where none could run is an error (status 1)."""
    (tmp_path / "notes.jsonl").write_text("not json\n[1, 2]\n")
    result = subprocess.run([sys.executable, "-m", "openbagel", "batch", str(tmp_path / "notes.jsonl"), "--model",
                             str(tiny_checkpoint), "--out", str(tmp_path / "r")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: no task of {tmp_path / 'notes.jsonl'} could run"
    assert len((tmp_path / "r" / "results.jsonl").read_text().splitlines()) == 2
