"""`openbagel`: the command line. Each command maps its flags onto one pipeline call and prints where
the results went; the work itself is in `BagelPipeline`, the server, the app, the trainer and `shapes`.

Errors a user can cause (bad input, a missing file, a broken checkpoint) end with one line on stderr
and exit status 1; heavy modules are imported inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

RENORM_TYPES = ("global", "channel", "text_channel")  # = sampler.RENORM_TYPES (not imported: keeps --help fast)
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


# ----- shared flags --------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    from .serve.wire import parse_size

    try:
        height, width = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return height, width


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return int(text)


def _image_path(text: str) -> str:
    """An output image path whose format Pillow knows, checked before the model loads."""
    from PIL import Image

    suffix = Path(text).suffix.lower()
    if not suffix or suffix not in Image.registered_extensions():
        raise argparse.ArgumentTypeError(f"{text!r} is not an image file name; end it in .png, .jpg or .webp")
    return text


def _interval(text: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"use START or START,END (e.g. 0.4 or 0.4,1.0), got {text!r}")
    return (parts[0], parts[1] if len(parts) == 2 else 1.0)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded Shapes model)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    g.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="weights dtype (default: bf16 on CUDA, fp32 elsewhere)")
    g.add_argument("--offload", action="store_true",
                   help="keep the decoder layers in CPU memory and stream each to --device when it runs "
                        "(for GPUs too small for the model; slower)")
    g.add_argument("--quantize", default=None, metavar="MODE",
                   help="quantise the language model's weights while loading: int8 or int4 (any device; both "
                        "also keep the token embedding and the ViT in int8; int4 stores the language model's "
                        "Linear weights in about half of int8's bytes and, on x86, decodes faster), torchao-int8, "
                        "torchao-int4, bnb-int8, bnb-nf4 (CUDA; need torchao / bitsandbytes), torchao-fp8 "
                        "(fp8 weights and activations: faster on Ada / Hopper GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers for denoising: the first image compiles for 10-35 s, "
                        "later ones are faster (7B 1024² on an H100: 12.2 -> 10.0 s); for `serve`, `app`, `batch`")


def add_sampler_args(p: argparse.ArgumentParser, *, image: bool = True, edit: bool = False) -> None:
    """The settings of `openbagel.inference.settings` as flags; unset flags keep the per-task defaults."""
    g = p.add_argument_group("sampling (defaults per task, as in the official app)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--think", action="store_true", help="let the model write a thought first")
    g.add_argument("--max-think-tokens", type=int, default=None, help="longest thought or answer, in tokens")
    g.add_argument("--do-sample", action="store_true", default=None, help="sample text instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None, help="text sampling temperature (with --do-sample)")
    if not image:
        return
    g.add_argument("--steps", type=int, default=None, help="denoising steps (num_inference_steps)")
    g.add_argument("--cfg-text-scale", "--guidance-scale", dest="cfg_text_scale", type=float, default=None,
                   help="text guidance strength")
    if edit:
        g.add_argument("--cfg-img-scale", type=float, default=None, help="image guidance strength (edits)")
    g.add_argument("--cfg-interval", type=_interval, default=None, metavar="START[,END]",
                   help="fraction of the schedule where guidance applies")
    g.add_argument("--cfg-renorm-type", choices=RENORM_TYPES, default=None, help="guidance renormalisation")
    g.add_argument("--cfg-renorm-min", type=float, default=None, help="lower clamp of the renorm factor")
    g.add_argument("--timestep-shift", type=float, default=None, help="schedule shift (higher = more early steps)")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags -> pipeline settings; unset flags are None and keep the defaults (settings.resolve)."""
    names = {"steps": "num_inference_steps", "cfg_text_scale": "cfg_text_scale", "cfg_img_scale": "cfg_img_scale",
             "cfg_interval": "cfg_interval", "cfg_renorm_type": "cfg_renorm_type", "cfg_renorm_min": "cfg_renorm_min",
             "timestep_shift": "timestep_shift", "max_think_tokens": "max_think_token_n", "do_sample": "do_sample",
             "temperature": "temperature"}
    return {setting: getattr(args, flag) for flag, setting in names.items() if getattr(args, flag, None) is not None}


def load_pipeline(args: argparse.Namespace):
    from .inference.pipeline import EMBEDDED_MODEL, BagelPipeline

    if args.model is None and not EMBEDDED_MODEL.is_dir():
        from .checkpoint import CheckpointError

        raise CheckpointError(f"the embedded model is not in this install ({EMBEDDED_MODEL}); "
                              "pass --model with a checkpoint folder or a hub id")
    print(f"loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    pipe = BagelPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, offload=args.offload,
                                         quantize=args.quantize)
    pipe.engine.compile_step = args.compile
    return pipe


def _open(path: str, name: str):
    from .processing import open_image

    return open_image(path, name=name)


def _save(image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _numbered(path: Path, i: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{i + 1}{path.suffix}")


def _thought(out) -> str | None:
    """The thought, or everything written when the model never closed its </think>."""
    return out.thought if out.thought is not None else out.raw_text


def _print_thought(out, think: bool) -> None:
    if think:
        print(f"thought: {_thought(out)}")


# ----- commands ------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    from .inference.pipeline import Request

    pipe = load_pipeline(args)
    height, width = args.size or (None, None)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    tasks = [Request("generate", args.prompt, think=args.think, seed=seed + i, height=height, width=width,
                     settings=settings_from_args(args)) for i in range(args.n)]
    for i, out in enumerate(pipe.run(tasks)):
        _print_thought(out, args.think)
        print(_save(out.images[0], _numbered(Path(args.out), i, args.n)))


def cmd_edit(args: argparse.Namespace) -> None:
    image = _open(args.image, "image")  # fail before the slow model load
    pipe = load_pipeline(args)
    out = pipe.edit(image, args.instruction, think=args.think, seed=args.seed,
                    **settings_from_args(args))
    _print_thought(out, args.think)
    print(_save(out.images[0], args.out))


def cmd_understand(args: argparse.Namespace) -> None:
    image = _open(args.image, "image") if args.image else None
    pipe = load_pipeline(args)
    out = pipe.understand(image, args.question, think=args.think, seed=args.seed, **settings_from_args(args))
    _print_thought(out, args.think)
    print(out.text)


def cmd_chat(args: argparse.Namespace) -> None:
    from .inference.pipeline import InputError
    from .inference.session import EditSession

    if not (args.image or args.resume):
        raise InputError("give an IMAGE to start from, or --resume a saved session folder")
    out_dir = Path(args.out)
    resuming_here = args.resume is not None and Path(args.resume).resolve() == out_dir.resolve()
    if (out_dir / "session.json").exists() and not resuming_here:
        raise InputError(f"{out_dir} already holds a session; continue it with --resume {out_dir}, "
                         "or give another --out")
    image = _open(args.image, "image") if args.image else None
    pipe = load_pipeline(args)
    if args.resume:
        session = EditSession.load(pipe, args.resume)
    else:
        session = pipe.session(image, think=args.think, seed=args.seed or 0, **settings_from_args(args))
    session.save(out_dir)
    interactive = sys.stdin.isatty()
    print("each line edits the latest image; /undo, /save DIR, /quit", file=sys.stderr)
    while True:
        if interactive:
            print(f"[{len(session.turns)}]> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            if line == "/undo":
                undone = session.undo()
                (out_dir / f"turn_{len(session.turns) + 1:02d}.png").unlink(missing_ok=True)
                session.save(out_dir)
                print(f"undid {undone.instruction!r}; latest image: {_latest(out_dir, session)}")
            elif line.startswith("/save"):
                target = line.removeprefix("/save").strip()
                if not target:
                    raise InputError("/save needs a folder: /save DIR")
                print(f"saved the session to {session.save(target)}")
            elif line.startswith("/"):
                raise InputError(f"unknown command {line.split()[0]}; use /undo, /save DIR or /quit")
            else:
                out = session.edit(line)
                session.save(out_dir)
                _print_thought(out, session.think)
                print(_latest(out_dir, session))
        except ValueError as exc:  # one bad turn does not end the chat
            print(f"error: {exc}", file=sys.stderr)
    print(f"session saved in {out_dir} (continue with: openbagel chat --resume {out_dir})", file=sys.stderr)


def _latest(out_dir: Path, session) -> Path:
    """The file `EditSession.save` wrote for the latest image."""
    return out_dir / (f"turn_{len(session.turns):02d}.png" if session.turns else "source.png")


def cmd_batch(args: argparse.Namespace) -> int:
    from .inference.batch import run_batch_file
    from .inference.pipeline import InputError
    from .inference.settings import resolve

    settings = settings_from_args(args)
    try:
        for task in ("generate", "edit"):  # the flags apply to every task: check them before the model loads
            resolve(task, settings)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder for results.jsonl and the images")
    pipe = load_pipeline(args)
    results = run_batch_file(pipe, args.tasks, args.out, max_batch=args.max_batch, settings=settings)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"{r['id']}: error: {r['error']}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} tasks done; results in {Path(args.out) / 'results.jsonl'}")
    if len(failed) == len(results):  # a partial failure is reported per task; nothing done at all is an error
        print(f"error: no task of {args.tasks} could run" if results else f"error: {args.tasks} holds no tasks",
              file=sys.stderr)
        return 1
    return 0


def cmd_app(args: argparse.Namespace) -> None:
    from .serve.gradio_app import build_demo

    demo = build_demo(load_pipeline(args))
    demo.queue(max_size=args.queue_size).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                 show_error=True)


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve.server import serve

    api_key = args.api_key or os.environ.get("OPENBAGEL_API_KEY") or None
    serve(load_pipeline(args), host=args.host, port=args.port, api_key=api_key, sessions_db=args.sessions_db,
          queue_size=args.queue_size, timeout_s=args.timeout, max_body_bytes=int(args.max_body_mb * 2**20),
          allowed_origins=args.allowed_origins)


def cmd_download(args: argparse.Namespace) -> None:
    from .checkpoint import download

    print(download(args.repo_id, args.out))


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import resolve_path
    from .config import BagelConfig
    from .inference.pipeline import EMBEDDED_MODEL
    from .inference.quantize import WEIGHT_BYTES, int8_extras, language_model_linears
    from .models.bagel import Bagel
    from .models.vae import AutoEncoder

    path = resolve_path(args.model or EMBEDDED_MODEL)
    cfg = BagelConfig.load(path)
    with torch.device("meta"):  # shapes only: nothing is allocated or read
        model, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    llm, vit = cfg.llm, cfg.vit
    print(f"checkpoint: {path}")
    print(f"language model: {llm.num_hidden_layers} layers, hidden {llm.hidden_size}, {llm.num_attention_heads} heads "
          f"({llm.num_key_value_heads} kv), vocab {llm.vocab_size}, two experts (understanding, generation)")
    print(f"vision encoder: {vit.num_hidden_layers} layers, hidden {vit.hidden_size}, patch {vit.patch_size}")
    print(f"autoencoder: z {cfg.vae.z_channels} channels, downsample {cfg.vae.downsample}; "
          f"default image {cfg.default_image_size[1]}x{cfg.default_image_size[0]}, largest side {cfg.max_image_side}")
    print(f"think mode: {'yes' if cfg.think_system_prompts else 'no'}")
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["vae (kept in fp32)"] = sum(p.numel() for p in vae.parameters())
    width = max(map(len, counts))
    print("\nparameters:")
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>15,}")
    total = sum(counts.values())
    print(f"  {'total':<{width}}  {total:>15,}")
    vae_n = counts["vae (kept in fp32)"]
    # --quantize int8 / int4 store the language model's Linear weights in one byte / half a byte (plus a
    # bf16 (scale, zero) pair per 64 weights), its token embedding and the ViT's Linear weights in one
    # byte; the rest stays in the dtype
    linear_n = sum(m.weight.numel() for name, m in model.named_modules() if language_model_linears(name, m))
    int8_n = sum(m.weight.numel() for name, m in model.named_modules() if int8_extras(name, m))
    rest_n = total - vae_n - linear_n - int8_n
    print("\nweights in memory (activations and KV cache come on top):")
    for dtype, nbytes in DTYPE_BYTES.items():
        print(f"  {dtype:<5} {_human((total - vae_n) * nbytes + vae_n * 4)}")
    for mode, linear_bytes in WEIGHT_BYTES.items():
        for dtype, nbytes in DTYPE_BYTES.items():
            held = linear_n * linear_bytes + int8_n + rest_n * nbytes + vae_n * 4
            print(f"  {mode} weights, the rest {dtype:<5} {_human(held)}"
                  f"  (--quantize {mode}{' on CPU' if dtype == 'fp32' else ''})")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cmd_demo(args: argparse.Namespace) -> None:
    from .serve.examples import shapes_examples

    pipe = load_pipeline(args)
    out_dir = Path(args.out)
    settings = settings_from_args(args)
    seed = args.seed or 0

    prompt = shapes_examples("generate", 1, seed)[0].text
    out = pipe.generate(prompt, seed=seed, **settings)
    print(f"1. generate  {prompt!r}\n   -> {_save(out.images[0], out_dir / '1_generate.png')}")

    ex = shapes_examples("edit", 1, seed)[0]
    out = pipe.edit(ex.image, ex.text, seed=seed, **settings)
    print(f"2. edit      {ex.text!r}\n   {_save(ex.image, out_dir / '2_edit_input.png')}"
          f" -> {_save(out.images[0], out_dir / '2_edit.png')}")

    ex = shapes_examples("question", 1, seed)[0]
    out = pipe.understand(ex.image, ex.text, seed=seed, **settings)  # image settings are accepted and unused
    print(f"3. question  {ex.text!r} about {_save(ex.image, out_dir / '3_question_input.png')}\n   -> {out.text}")

    ex = shapes_examples("reason_edit", 1, seed)[0]
    out = pipe.edit(ex.image, ex.text, think=True, seed=seed, **settings)
    print(f"4. think+edit {ex.text!r}\n   thought: {_thought(out)}\n   {_save(ex.image, out_dir / '4_think_input.png')}"
          f" -> {_save(out.images[0], out_dir / '4_think_edit.png')}")

    prompt = shapes_examples("generate:position", 1, seed)[0].text  # a partial prompt: the plan fills in the rest
    out = pipe.generate(prompt, think=True, seed=seed, **settings)
    print(f"5. think+draw {prompt!r}\n   thought: {_thought(out)}\n"
          f"   -> {_save(out.images[0], out_dir / '5_think_generate.png')}")


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    try:
        from .train.main import register
    except ImportError as exc:
        missing = str(exc)

        def unavailable(_: argparse.Namespace) -> None:
            raise SystemExit(f"error: training is not available in this install ({missing})")

        p = subparsers.add_parser("train", help="train or fine-tune (not available in this install)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=unavailable)
        return
    register(subparsers)


# ----- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openbagel", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="BAGEL from the command line: draw from text, edit images, answer questions, think, "
                    "chat (multi-turn editing), serve an OpenAI-compatible API or a web app.",
        epilog="example: openbagel demo --out demo/   (each command has --help with an example)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, summary: str, example: str, *, model: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        if model:
            add_model_args(p)
        return p

    p = command("generate", cmd_generate, "Draw an image from a text prompt.",
                'openbagel generate "a red circle left of a blue square" --out circle.png --steps 30 --seed 1')
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--out", type=_image_path, default="generated.png", help="output PNG (default generated.png)")
    p.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size (default: the model's)")
    p.add_argument("-n", type=int, default=1, choices=range(1, 17), metavar="N", help="images to draw (1-16)")
    add_sampler_args(p)

    p = command("edit", cmd_edit, "Edit an image following an instruction.",
                'openbagel edit scene.png "make the circle green" --out edited.png')
    p.add_argument("image", help="input image file")
    p.add_argument("instruction", help="what to change")
    p.add_argument("--out", type=_image_path, default="edited.png", help="output PNG (default edited.png)")
    add_sampler_args(p, edit=True)

    p = command("understand", cmd_understand, "Answer a question about an image (or a text-only question).",
                'openbagel understand scene.png "what color is the square?" --think')
    p.add_argument("image", nargs="?", default=None, help="image file (leave out for a text-only question)")
    p.add_argument("question", help="the question")
    add_sampler_args(p, image=False)

    p = command("chat", cmd_chat, "Multi-turn editing in the terminal: each line edits the latest image. "
                "Commands: /undo, /save DIR, /quit. Reads stdin, so instructions can be piped in.",
                'printf "make the circle red\\nadd a small square\\n/undo\\n" | openbagel chat scene.png --out chat/')
    p.add_argument("image", nargs="?", default=None, help="starting image (or use --resume)")
    p.add_argument("--out", default="chat", help="folder for the images and session.json (default chat/)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue a session saved with /save or --out")
    add_sampler_args(p, edit=True)

    p = command("batch", cmd_batch, "Run a JSONL file of tasks (generate, edit, understand, chat) in batches.",
                "openbagel shapes sample --kind edit -n 8 --out tasks/\n"
                "  openbagel batch tasks/tasks.jsonl --out results/")
    p.add_argument("tasks", help="tasks .jsonl file; image paths are relative to its folder")
    p.add_argument("--out", required=True, help="output folder (results.jsonl and images)")
    p.add_argument("--max-batch", type=_positive, default=16, help="tasks per forward batch (default 16)")
    add_sampler_args(p, edit=True)

    p = command("app", cmd_app, "Start the web app (Gradio): Generate, Edit, Understand and Chat tabs.",
                "openbagel app --port 7860   # then open http://127.0.0.1:7860")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait (default 16)")

    from .serve.wire import DEFAULT_QUEUE_SIZE, DEFAULT_TIMEOUT_S, MAX_BODY_BYTES

    p = command("serve", cmd_serve, "Start the OpenAI-compatible HTTP server (images, chat, editing sessions).",
                "openbagel serve --port 8000   # then: curl http://127.0.0.1:8000/v1/models")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set OPENBAGEL_API_KEY)")
    p.add_argument("--sessions-db", default="openbagel-sessions.sqlite3",
                   help="SQLite file for editing sessions (default: %(default)s)")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="requests that may wait for the model besides the running one; more get 429 "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds before a request gets 504 (default: %(default)g)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20,
                   help="largest request body in MB (default: %(default)g)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="let browser pages on these origins call the API (CORS), e.g. http://localhost:3000, "
                        "or '*' for any (default: none)")

    p = command("download", cmd_download, "Download a checkpoint from the Hugging Face hub into a folder.",
                "openbagel download ByteDance-Seed/BAGEL-7B-MoT --out models/BAGEL-7B-MoT", model=False)
    p.add_argument("repo_id", help="hub id, e.g. ByteDance-Seed/BAGEL-7B-MoT")
    p.add_argument("--out", default=None, help="folder (default: the huggingface_hub cache)")

    p = command("info", cmd_info, "Describe a checkpoint: config, parameters per component, memory per dtype.",
                "openbagel info --model models/BAGEL-7B-MoT", model=False)
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")

    p = command("demo", cmd_demo, "The tour: draw, edit, answer a question, make a thinking edit and plan a "
                "drawing, with Shapes-world examples; writes the images into --out.", "openbagel demo --out demo/")
    p.add_argument("--out", default="demo", help="output folder (default demo/)")
    add_sampler_args(p, edit=True)

    _add_train(sub)
    from .shapes.cli import register as register_shapes

    register_shapes(sub)
    return parser


# Which extra of pyproject.toml brings each optional package.
OPTIONAL_EXTRAS = {"gradio": "app", "fastapi": "serve", "uvicorn": "serve", "pydantic": "serve", "multipart": "serve",
                   "matplotlib": "train", "pyarrow": "train", "torchao": "quant"}


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; errors a user can cause end as one line on stderr and exit status 1."""
    try:
        result = args.func(args)
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        package = (exc.name or "").split(".")[0]
        extra = OPTIONAL_EXTRAS.get(package)
        hint = f"pip install 'openbagel[{extra}]'" if extra else f"pip install {package}"
        print(f"error: this command needs the package {package!r}, which is not installed: {hint}", file=sys.stderr)
        return 1
    except ImportError as exc:  # a feature that needs what this machine lacks (bitsandbytes and a GPU, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # InputError, ImageLoadError, CheckpointError, ConfigError, bad settings
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
