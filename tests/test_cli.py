"""The `openbagel` command line, run in-process on the tiny random checkpoint (3 denoising steps)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from openbagel import cli

FAST = ["--steps", "3", "--max-think-tokens", "8"]
COMMANDS = ["generate", "edit", "understand", "chat", "batch", "app", "serve", "download", "info", "demo", "train",
            "shapes", "eval"]


@pytest.fixture
def shared_pipeline(monkeypatch, tiny_pipeline):
    """Skip the model load in commands that do not test it."""
    monkeypatch.setattr(cli, "load_pipeline", lambda args: tiny_pipeline)
    return tiny_pipeline


@pytest.fixture
def scene(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (250, 250, 250)).save(path)
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: openbagel {command}" in text
    if command not in ("train", "shapes", "eval"):  # delegated: their own modules own their help
        assert "example:" in text and f"openbagel {command}" in text.split("example:")[1]


def test_generate_edit_understand(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out" / "g.png"
    code, stdout, _ = run(["generate", "a red circle", "--model", tiny_checkpoint, "--out", out, "--size", "64x48",
                           "-n", "2", "--seed", "1", *FAST], capsys)
    assert code == 0
    paths = [Path(p) for p in stdout.split()]
    assert [p.name for p in paths] == ["g-1.png", "g-2.png"]
    assert Image.open(paths[0]).size == (64, 48)

    edited = tmp_path / "e.png"
    code, stdout, _ = run(["edit", paths[0], "make it blue", "--model", tiny_checkpoint, "--out", edited,
                           "--think", "--cfg-interval", "0.2,1.0", "--cfg-renorm-type", "global", *FAST], capsys)
    assert code == 0 and stdout.splitlines()[0].startswith("thought:") and stdout.splitlines()[-1] == str(edited)
    assert edited.is_file()

    code, stdout, _ = run(["understand", edited, "what color is it?", "--model", tiny_checkpoint,
                           "--max-think-tokens", "6"], capsys)
    assert code == 0 and stdout.strip()


def test_compile_flag_turns_on_the_compiled_denoising_step(tiny_checkpoint):
    for flags, expected in [([], False), (["--compile"], True)]:
        args = cli.build_parser().parse_args(["generate", "x", "--model", str(tiny_checkpoint), "--device", "cpu", *flags])
        assert cli.load_pipeline(args).engine.compile_step is expected


def test_chat_reads_piped_stdin(monkeypatch, shared_pipeline, scene, tmp_path, capsys):
    out, saved = tmp_path / "chat", tmp_path / "saved"
    lines = ["make it red", "", "add a square", "/undo", "/bogus", f"/save {saved}", "make it green", "/quit",
             "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code, stdout, stderr = run(["chat", scene, "--out", out, "--seed", "3", *FAST], capsys)
    assert code == 0
    assert "unknown command /bogus" in stderr
    assert f"undid 'add a square'; latest image: {out / 'turn_01.png'}" in stdout
    meta = json.loads((out / "session.json").read_text())
    assert [t["instruction"] for t in meta["turns"]] == ["make it red", "make it green"]
    assert sorted(p.name for p in out.glob("*.png")) == ["source.png", "turn_01.png", "turn_02.png"]
    assert len(json.loads((saved / "session.json").read_text())["turns"]) == 1

    monkeypatch.setattr(sys, "stdin", io.StringIO("one more\n"))
    code, stdout, _ = run(["chat", "--resume", out, "--out", out, *FAST], capsys)
    assert code == 0 and stdout.strip() == str(out / "turn_03.png")

    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    code, _, stderr = run(["chat", scene, "--out", out, *FAST], capsys)  # a new session would overwrite it
    assert code == 1 and f"{out} already holds a session; continue it with --resume {out}" in stderr
    monkeypatch.chdir(out)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    code, _, stderr = run(["chat", scene, "--out", ".", *FAST], capsys)  # the same folder, named otherwise
    assert code == 1 and "already holds a session" in stderr
    assert len(json.loads((out / "session.json").read_text())["turns"]) == 3


def test_batch(shared_pipeline, tmp_path, capsys):
    assert cli.main(["shapes", "sample", "--kind", "question", "-n", "2", "--out", str(tmp_path / "tasks")]) == 0
    code, stdout, _ = run(["batch", tmp_path / "tasks" / "tasks.jsonl", "--out", tmp_path / "res", *FAST], capsys)
    assert code == 0 and "2 of 2 tasks done" in stdout
    assert len((tmp_path / "res" / "results.jsonl").read_text().splitlines()) == 2


def test_info(tiny_checkpoint, capsys):
    code, stdout, _ = run(["info", "--model", tiny_checkpoint], capsys)
    assert code == 0
    assert "language_model" in stdout and "vae (kept in fp32)" in stdout and "total" in stdout
    assert all(f"  {dtype}" in stdout for dtype in ("fp32", "bf16"))
    assert all(f"{mode} weights, the rest {dtype}" in stdout for mode in ("int8", "int4") for dtype in ("fp32", "bf16"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_info_predicts_the_memory_of_a_quantised_model(mode, capsys):
    """What `info` prints for `--quantize MODE on CPU` is what loading the embedded model that way holds
    (the per-channel scales it leaves out are ~1% at this width)."""
    from openbagel.inference.pipeline import BagelPipeline
    from openbagel.inference.quantize import weight_bytes

    code, stdout, _ = run(["info"], capsys)
    line = next(x for x in stdout.splitlines() if f"(--quantize {mode} on CPU)" in x)
    printed_mb = float(line.split("fp32")[1].split("MB")[0])
    pipe = BagelPipeline.from_pretrained(device="cpu", dtype="fp32", quantize=mode)
    held_mb = (weight_bytes(pipe.engine.model) + weight_bytes(pipe.engine.vae)) / 2**20
    assert code == 0 and abs(printed_mb - held_mb) < 0.03 * held_mb


def test_demo(shared_pipeline, tmp_path, capsys):
    code, stdout, _ = run(["demo", "--out", tmp_path / "demo", *FAST], capsys)
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "demo").glob("*.png"))
    assert names == ["1_generate.png", "2_edit.png", "2_edit_input.png", "3_question_input.png", "4_think_edit.png",
                     "4_think_input.png", "5_think_generate.png"]
    assert stdout.count("thought:") == 2 and str(tmp_path / "demo" / "4_think_edit.png") in stdout


@pytest.mark.parametrize("argv, message", [
    (["edit", "{missing}", "x"], "does not exist"),
    (["generate", "x", "--size", "65x64"], "multiple of 16"),
    (["generate", "x", "--steps", "-3"], "num_inference_steps"),
    (["generate", "   "], "empty"),
    (["understand", "{notimage}", "what?"], "not a readable image"),
    (["chat"], "give an IMAGE"),
])
def test_errors_are_one_clear_line(argv, message, shared_pipeline, tmp_path, capsys):
    (tmp_path / "notimage.png").write_text("hello")
    argv = [a.format(missing=tmp_path / "missing.png", notimage=tmp_path / "notimage.png") for a in argv]
    code, _, stderr = run(argv, capsys)
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr


def test_missing_checkpoint_in_a_real_process(tmp_path):
    """A subprocess shows exactly what a user sees: one line, no traceback, exit status 1."""
    result = subprocess.run([sys.executable, "-m", "openbagel", "generate", "x", "--model", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "llm_config.json" in result.stderr


# Runs the CLI with the optional extras (app, serve, train, quant) made unimportable, as on a base install.
BASE_INSTALL = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"pydantic", "fastapi", "uvicorn", "gradio", "matplotlib", "pyarrow", "torchao"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from openbagel.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv, code, message", [
    (["--help"], 0, "usage: openbagel"),
    (["generate", "a red circle", "--size", "big"], 2, "size must look like '512x512'"),
    (["serve"], 1, "error: this command needs the package 'fastapi', which is not installed: "
                   "pip install 'openbagel[serve]'"),
    (["app"], 1, "pip install 'openbagel[app]'"),
])
def test_base_install_without_the_extras(argv, code, message):
    """Without the serving / app extras the CLI still parses, and their commands say what to install."""
    result = subprocess.run([sys.executable, "-c", BASE_INSTALL, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
