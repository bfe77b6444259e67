"""The OpenAI-compatible server: the official `openai` client against a real uvicorn process on localhost,
on the tiny random checkpoint with 3 denoising steps."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from openbagel.serve.server import APIError, ModelWorker

KEY = "test-key"
FAST = {"num_inference_steps": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, db: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "openbagel", "serve", "--model", str(checkpoint), "--port", str(port),
         "--api-key", KEY, "--sessions-db", str(db), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    proc, url = start_server(tiny_checkpoint, tmp_path_factory.mktemp("db") / "sessions.sqlite3",
                             "--max-body-mb", "1", "--allowed-origins", "http://localhost:3000")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scene() -> Image.Image:
    from openbagel.serve.examples import shapes_examples

    return shapes_examples("edit", 1)[0].image


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ----- OpenAI endpoints ------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-random"]
    assert client.models.retrieve("tiny-random").id == "tiny-random"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-4o")
    assert exc.value.body["code"] == "model_not_found" and "tiny-random" in exc.value.body["message"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["queue_size"] == 16


def test_cors_preflight_for_allowed_origins_only(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(f"{server}/v1/chat/completions", headers={"Origin": "http://localhost:3000", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = httpx.options(f"{server}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_image_generation(client):
    result = client.images.generate(model="tiny-random", prompt="a red circle left of a blue square", n=2,
                                    size="64x48", response_format="b64_json", extra_body={"seed": 1, **FAST})
    images = [decode(d.b64_json) for d in result.data]
    assert len(images) == 2 and all(im.size == (64, 48) for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # seeds 1 and 2
    again = client.images.generate(model="tiny-random", prompt="a red circle left of a blue square", size="64x48",
                                   extra_body={"seed": 1, **FAST})
    assert decode(again.data[0].b64_json).tobytes() == images[0].tobytes()


def test_url_format_is_a_data_url(client):
    result = client.images.generate(model="m", prompt="a circle", response_format="url", extra_body=FAST)
    assert result.data[0].url.startswith("data:image/png;base64,")


def test_image_edit_with_mask(client):
    original = scene()
    mask = Image.new("RGBA", original.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent left half: the region to edit
    result = client.images.edit(model="m", image=("scene.png", png(original), "image/png"),
                                mask=("mask.png", png(mask), "image/png"), prompt="make the background gray",
                                extra_body={"seed": 3, **FAST})
    edited = decode(result.data[0].b64_json).convert("RGB")
    assert edited.size == original.size
    assert edited.crop((32, 0, 64, 64)).tobytes() == original.crop((32, 0, 64, 64)).tobytes()  # kept
    assert edited.crop((0, 0, 32, 64)).tobytes() != original.crop((0, 0, 32, 64)).tobytes()  # edited


def test_image_edit_without_mask_and_bad_mask(client):
    result = client.images.edit(model="m", image=("scene.png", png(scene()), "image/png"), prompt="remove the circle",
                                extra_body=FAST)
    assert decode(result.data[0].b64_json).size == (64, 64)
    odd = scene().resize((48, 80))  # the model draws 32x64 (its stride): the answer comes back at 48x80
    result = client.images.edit(model="m", image=("odd.png", png(odd), "image/png"), prompt="remove the circle",
                                extra_body={"cfg_interval": [0.0, 1.0], **FAST})  # a list: sent as cfg_interval[]
    assert decode(result.data[0].b64_json).size == (48, 80) and result.size == "48x80"
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(model="m", image=[("a.png", png(scene()), "image/png"), ("b.png", png(odd), "image/png")],
                           prompt="x", extra_body=FAST)
    assert exc.value.body["code"] == "too_many_images"
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(model="m", image=("scene.png", png(scene()), "image/png"), prompt="x",
                           mask=("mask.png", png(Image.new("RGB", (64, 64))), "image/png"), extra_body=FAST)
    assert "alpha channel" in exc.value.body["message"]


def test_chat_with_an_image(client):
    reply = client.chat.completions.create(model="m", max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(scene())}},
        {"type": "text", "text": "what color is the circle?"}]}])
    assert reply.object == "chat.completion" and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].message.reasoning_content is None  # present as null, not left out
    usage = reply.usage
    assert usage.prompt_tokens > 64 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # finish_reason says whether the model ended the answer or max_tokens cut it
    assert reply.choices[0].finish_reason == ("length" if usage.completion_tokens == 8 else "stop")
    cut = client.chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert cut.usage.completion_tokens <= 1
    assert cut.choices[0].finish_reason == ("length" if cut.usage.completion_tokens == 1 else "stop")


def test_chat_n_choices_and_a_bare_image_url(client):
    reply = client.chat.completions.create(model="m", max_tokens=4, n=2, seed=5, temperature=1.0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": data_url(scene())},
                                     {"type": "text", "text": "what color is the circle?"}]}])
    assert [c.index for c in reply.choices] == [0, 1]
    again = client.chat.completions.create(model="m", max_tokens=4, seed=6, temperature=1.0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": data_url(scene())},
                                     {"type": "text", "text": "what color is the circle?"}]}])
    assert again.choices[0].message.content == reply.choices[1].message.content  # choice i has seed + i
    assert reply.usage.prompt_tokens == again.usage.prompt_tokens  # one prompt, counted once
    assert reply.usage.completion_tokens == reply.usage.total_tokens - reply.usage.prompt_tokens
    unset = client.chat.completions.create(model="m", max_tokens=2, n=None, messages=[{"role": "user", "content": "hi"}])
    assert len(unset.choices) == 1


def test_partial_think_tags_and_form_lists():
    from openbagel.serve import protocol as P

    assert P.split_partial("<") == ("", "") and P.split_partial("<th") == ("", "")  # undecided: nothing yet
    assert P.split_partial("<think>so: make") == ("so: make", "")
    assert P.split_partial("<think>so</think> red") == ("so", "red")
    assert P.split_partial("<b>red") == ("", "<b>red") and P.split_partial("red") == ("", "red")
    body = P.ImageEditRequest.from_form([("prompt", "x"), ("cfg_interval[]", "0.0"), ("cfg_interval[]", "1.0")])
    assert body.settings["cfg_interval"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="was sent both as 'prompt' and as 'prompt\\[\\]'"):
        P.ImageEditRequest.from_form([("prompt", "x"), ("prompt[]", "y")])


def test_chat_streams_the_thought_and_answer(client):
    stream = client.chat.completions.create(model="m", max_tokens=12, stream=True, messages=[
        {"role": "user", "content": "describe a red circle."}], extra_body={"think": True},
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == ("length" if usage.completion_tokens == 12 else "stop")
    streamed = [c.choices[0].delta for c in chunks[1:-2]]
    assert streamed and all((d.content or getattr(d, "reasoning_content", None)) for d in streamed)
    assert not any("<think>" in (d.content or "") for d in streamed)


def test_chat_draws_and_edits_when_asked_for_an_image(client):
    drawn = client.chat.completions.create(model="m", modalities=["image"], messages=[
        {"role": "user", "content": "a blue square"}], extra_body={"size": "48x64", **FAST})
    part = drawn.choices[0].message.content[0]
    first = decode(part["image_url"]["url"].split(",", 1)[1])
    assert first.size == (48, 64)
    edited = client.chat.completions.create(model="m", modalities=["image"], messages=[
        {"role": "user", "content": "a blue square"}, {"role": "assistant", "content": [part]},
        {"role": "user", "content": "make it red"}], extra_body={"think": True, "max_think_token_n": 6, **FAST})
    assert edited.choices[0].message.content[0]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("call, param_or_text", [
    (lambda c: c.images.generate(model="m", prompt="   "), "empty"),
    (lambda c: c.images.generate(model="m", prompt="x", size="65x64"), "multiple of 16"),
    (lambda c: c.images.generate(model="m", prompt="x", size="big"), "size"),
    (lambda c: c.images.generate(model="m", prompt="x", n=9), "n"),
    (lambda c: c.images.generate(model="m", prompt="x", extra_body={"num_inference_steps": -1}), "num_inference"),
    (lambda c: c.images.generate(model="m", prompt="x", extra_body={"no_such_setting": 1}), "unknown setting"),
    (lambda c: c.images.edit(model="m", image=("a.png", b"not an image", "image/png"), prompt="x"), "readable"),
    (lambda c: c.images.edit(model="m", image=("a.png", png(scene()), "image/png"), prompt="x", size="64x64"),
     "size"),
    (lambda c: c.chat.completions.create(model="m", messages=[]), "messages"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, {"type": "text", "text": "?"}]}]),
     "not fetched"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}]), "base64"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), "tool (function) calling"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]), "not supported"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2, stream=True),
     "n"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                         extra_body={"stream": "yes"}), "stream"),
    (lambda c: c.images.generate(model="m", prompt="x", n=2, extra_body={"seed": 2**63 - 1}), "below 2**63"),
])
def test_bad_requests_get_openai_error_objects(client, call, param_or_text):
    with pytest.raises(openai.BadRequestError) as exc:
        call(client)
    error = exc.value.body
    assert exc.value.status_code == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert param_or_text in error["message"] or param_or_text == error["param"]


def test_auth_limits_and_unknown_paths(server):
    assert httpx.get(f"{server}/v1/models").status_code == 401
    json_body = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for path, body in [("chat/completions", b'{"messages": [{"role": "user", "content": "a red \\ud800 circle"}]}'),
                       ("images/generations", b'{"prompt": "a red \\ud800 circle"}')]:  # valid JSON, not Unicode
        lone = httpx.post(f"{server}/v1/{path}", headers=json_body, content=body)
        assert lone.status_code == 400 and "unpaired surrogate" in lone.json()["error"]["message"]
    unauthenticated_garbage = httpx.post(f"{server}/v1/images/generations", content=b"{not json",
                                         headers={"Content-Type": "application/json"})
    assert unauthenticated_garbage.status_code == 401  # the key is checked before the body is read
    wrong = httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(f"{server}/v1/images/generations", headers={**auth, "Content-Type": "application/json"},
                     content=b'{"prompt": "' + b"x" * (2 * 2**20) + b'"}')
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad_json = httpx.post(f"{server}/v1/images/generations", headers={**auth, "Content-Type": "application/json"},
                          content=b"{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    infinite = httpx.post(f"{server}/v1/images/generations", headers={**auth, "Content-Type": "application/json"},
                          content=b'{"prompt": "x", "cfg_text_scale": Infinity}')
    assert infinite.status_code == 400 and "finite" in infinite.json()["error"]["message"]
    missing = httpx.get(f"{server}/v1/nothing-here", headers=auth)
    assert missing.status_code == 404 and "error" in missing.json()
    for sid in ("sess_" + "0" * 32, "..%2F..%2Fetc%2Fpasswd"):
        r = httpx.get(f"{server}/v1/sessions/{sid}", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] in ("session_not_found", "not_found")


# ----- the model queue -------------------------------------------------------------------------------


class _Req:
    async def is_disconnected(self) -> bool:
        return False


def test_queue_is_bounded_and_times_out():
    async def scenario():
        worker = ModelWorker(queue_size=1, timeout_s=0.5)
        gate = threading.Event()
        job = worker.start(lambda job: gate.wait(5))
        waiting = worker.start(lambda job: None)  # queue_size 1: one request may wait behind the running one
        with pytest.raises(APIError) as full:
            worker.start(lambda job: None)
        assert full.value.status == 429 and int(full.value.headers["Retry-After"]) >= 1
        with pytest.raises(APIError) as late:
            await worker.result(job, _Req())
        assert late.value.status == 504 and job.cancelled.is_set()
        worker.release(waiting)
        assert worker.pending == 0  # the slots are free again
        gate.set()
        assert await worker.call(_Req(), lambda job: 42) == 42
        worker.shutdown()

    asyncio.run(scenario())


# ----- sessions --------------------------------------------------------------------------------------


def test_session_of_three_edits_survives_kill_9(tiny_checkpoint, tiny_pipeline, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    auth = {"Authorization": f"Bearer {KEY}"}
    instructions = ["make the background gray", "remove the circle", "add a small red square"]
    proc, url = start_server(tiny_checkpoint, db)
    try:
        created = httpx.post(f"{url}/v1/sessions", headers=auth, timeout=60,
                             json={"image": data_url(scene()), "seed": 7, **FAST})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        first = httpx.post(f"{url}/v1/sessions/{sid}/edits", headers=auth, json={"prompt": instructions[0]},
                           timeout=60)
        assert first.status_code == 200 and len(first.json()["turns"]) == 1
    finally:
        proc.kill()  # kill -9: no shutdown hook runs
        proc.wait()

    proc, url = start_server(tiny_checkpoint, db)
    try:
        for text in instructions[1:]:
            r = httpx.post(f"{url}/v1/sessions/{sid}/edits", headers=auth, json={"prompt": text}, timeout=60)
            assert r.status_code == 200, r.text
        state = httpx.get(f"{url}/v1/sessions/{sid}", headers=auth).json()
        assert [t["instruction"] for t in state["turns"]] == instructions
        assert [t["seed"] for t in state["turns"]] == [8, 9, 10]
        final = decode(state["image"]["b64_json"])

        # The same three edits in one uninterrupted in-process session give the same image.
        session = tiny_pipeline.session(scene(), seed=7, **FAST)
        for text in instructions:
            out = session.edit(text)
        assert final.tobytes() == out.images[0].tobytes()

        undone = httpx.post(f"{url}/v1/sessions/{sid}/undo", headers=auth, timeout=60).json()
        assert len(undone["turns"]) == 2
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=auth).json()["turns"] == undone["turns"]
    finally:
        stop(proc)
