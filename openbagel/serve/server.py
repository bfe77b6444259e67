"""The OpenAI-compatible HTTP server: `create_app(pipeline)` and `serve(...)`.

Routes are thin: validate (protocol.py), run the pipeline on the model thread, shape the answer.
Torch is not safe for concurrent forwards, so one thread runs the model and requests wait in a
bounded queue (429 + Retry-After when full). A request that times out or whose client goes away is
cancelled at the model's next denoising step or token. Every failure is an OpenAI error object;
bad input is a 4xx, never a 500. Nothing from a request is used as a file path: uploads are read
into memory (python-multipart spools large parts to the system temp folder only).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..inference.pipeline import BagelOutput, BagelPipeline, InputError
from ..inference.pipeline import Request as Task
from ..processing import ImageLoadError, open_image
from . import protocol as P
from . import wire as W
from .sessions import SessionManager, SessionNotFound, SessionRecord, SessionStore

log = logging.getLogger("openbagel.serve")
SESSION_ID_RE = re.compile(r"^sess_[0-9a-f]{32}$")
SHUTDOWN_GRACE_S = 7


# ----- errors ----------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorBody(message=self.message, type=self.type, param=self.param,
                                                 code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                        code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object (send it with Content-Type: application/json)",
                        code="invalid_json")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(SessionNotFound)
    async def _no_session(_: Request, exc: SessionNotFound) -> JSONResponse:
        return APIError(404, f"no session {exc.args[0]!r}", param="session_id", code="session_not_found").response()

    @app.exception_handler(ValueError)  # InputError, ImageLoadError, settings errors
    async def _bad_input(_: Request, exc: ValueError) -> JSONResponse:
        return APIError(400, str(exc), code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), type=kind, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, f"internal error ({type(exc).__name__}); see the server log",
                        type="server_error", code="internal_error").response()


class RequireKey:
    """ASGI middleware: /v1 routes need 'Authorization: Bearer KEY', checked before the body is read."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode("latin-1"), self.key):
                error = APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                                 type="authentication_error", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes`, by Content-Length or while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than {self.max_bytes // 2**20} MB"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await APIError(413, too_large, code="request_too_large").response()(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


# ----- the model thread ------------------------------------------------------------------------------


class JobCancelled(Exception):
    """Raised inside the model thread when the waiting request has timed out or gone away."""


@dataclass
class Job:
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None
    released: bool = False

    def check(self, *_: Any) -> None:
        """A pipeline callback (per step / per token) that aborts cancelled work."""
        if self.cancelled.is_set():
            raise JobCancelled


class ModelWorker:
    """One model thread and a bounded queue in front of it. Call from the event loop only."""

    def __init__(self, queue_size: int = W.DEFAULT_QUEUE_SIZE, timeout_s: float = W.DEFAULT_TIMEOUT_S) -> None:
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self.pending = 0
        self.mean_job_s = 5.0  # running estimate for Retry-After
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openbagel-model")

    def start(self, fn: Callable[[Job], Any]) -> Job:
        """Queue `fn(job)`; 429 when `queue_size` requests already wait behind the running one."""
        if self.pending > self.queue_size:
            retry = max(1, round(self.mean_job_s * self.pending))
            raise APIError(429, f"the server is busy ({self.pending - 1} requests waiting); retry in {retry} s",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
        self.pending += 1
        job = Job()
        job.future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn, job)
        job.future.add_done_callback(lambda future: self._finished(job, future))
        return job

    def _finished(self, job: Job, future: asyncio.Future) -> None:
        self.release(job)
        if not future.cancelled():
            future.exception()  # read it, so an abandoned job's JobCancelled is not logged as never retrieved

    def _run(self, fn: Callable[[Job], Any], job: Job) -> Any:
        job.check()  # skipped at once if cancelled while queued
        t0 = time.monotonic()
        try:
            return fn(job)
        finally:
            self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * (time.monotonic() - t0)

    def release(self, job: Job) -> None:
        """Free the job's slot (once) and cancel it if it is still queued or running."""
        job.cancelled.set()
        if not job.released:
            job.released = True
            self.pending -= 1

    async def result(self, job: Job, request: Request) -> Any:
        """Wait for the job, cancelling it on timeout (504) or when the client disconnects."""
        watcher = asyncio.ensure_future(_until_disconnected(request))
        try:
            done, _ = await asyncio.wait({job.future, watcher}, timeout=self.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.future in done:
                return job.future.result()
            if watcher in done:
                raise APIError(499, "client closed the request", code="client_closed")
            raise APIError(504, f"the request took longer than {self.timeout_s:g} s", type="server_error",
                           code="timeout")
        finally:
            watcher.cancel()
            self.release(job)

    async def call(self, request: Request, fn: Callable[[Job], Any]) -> Any:
        return await self.result(self.start(fn), request)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


# ----- helpers ---------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str = "png") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _image_data(image: Image.Image, response_format: str = "b64_json", fmt: str = "png") -> P.ImageData:
    b64 = _encode(image, fmt)
    if response_format == "url":
        return P.ImageData(url=f"data:image/{fmt};base64,{b64}")
    return P.ImageData(b64_json=b64)


def _images_response(outs: list[BagelOutput], body: P.ImageGenerationRequest) -> P.ImagesResponse:
    images = [o.images[0] for o in outs]
    w, h = images[0].size
    return P.ImagesResponse(data=[_image_data(im, body.response_format, body.output_format) for im in images],
                            output_format=body.output_format, size=f"{w}x{h}",
                            thoughts=[o.thought for o in outs] if body.think else None)


def _seeds(seed: int | None, n: int) -> list[int]:
    """n seeds from `seed` up (the n images of one request differ; the same request repeats them)."""
    base = secrets.randbelow(2**31) if seed is None else seed
    if base + n > 2**63:
        raise APIError(400, f"seed + n - 1 must be below 2**63 (the seeds are seed, seed + 1, ...); got seed {base} "
                       f"with n = {n}", param="seed", code="invalid_value")
    return [base + i for i in range(n)]


def _at_input_size(out: BagelOutput, image: Image.Image) -> BagelOutput:
    """An edit comes back at its input's size: the model works at its own resolution (a multiple of its
    stride, within its limits), so the result is resized back (bicubic) when the two differ."""
    if out.images[0].size != image.size:
        out.images[0] = out.images[0].resize(image.size, Image.Resampling.BICUBIC)
    return out


def read_mask(mask_bytes: bytes, size: tuple[int, int]) -> Image.Image:
    """The alpha channel of an OpenAI-style mask (transparent = edit here), checked against the image size."""
    open_image(mask_bytes, name="mask")  # size, bomb and format checks before decoding for real
    mask = Image.open(io.BytesIO(mask_bytes))
    if mask.size != size:
        raise InputError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
                         "they must be the same size")
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise InputError("the mask needs an alpha channel (a PNG where transparent pixels mark the area to edit)")
    return mask.convert("RGBA").getchannel("A")


def composite_by_mask(original: Image.Image, edited: Image.Image, alpha: Image.Image) -> Image.Image:
    """OpenAI mask semantics: where the mask is transparent (alpha 0) the edit shows; elsewhere the original.

    BAGEL edits the whole picture; the mask is honoured afterwards by blending the edited image (resized
    to the original's size) over the original, with the mask's alpha as the weight of the original.
    """
    return Image.composite(original, edited.resize(original.size, Image.Resampling.BICUBIC), alpha)


def _session_response(r: SessionRecord) -> P.SessionResponse:
    return P.SessionResponse(
        id=r.id, created=int(r.created), think=r.think, seed=r.seed, settings=r.settings,
        turns=[P.TurnInfo(index=k + 1, instruction=t.instruction, seed=t.seed, thought=t.thought)
               for k, t in enumerate(r.turns)],
        image=_image_data(r.image))


def _session_id(session_id: str) -> str:
    if not SESSION_ID_RE.match(session_id):
        raise SessionNotFound(session_id)
    return session_id


def _sse(chunk: Any) -> str:
    payload = chunk.model_dump_json(exclude_none=True) if hasattr(chunk, "model_dump_json") else chunk
    return f"data: {payload}\n\n"


# ----- the app ---------------------------------------------------------------------------------------


def create_app(pipe: BagelPipeline, *, model_name: str | None = None, api_key: str | None = None,
               sessions_db: str | Path = "openbagel-sessions.sqlite3", queue_size: int = W.DEFAULT_QUEUE_SIZE,
               timeout_s: float = W.DEFAULT_TIMEOUT_S, max_body_bytes: int = W.MAX_BODY_BYTES,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI app around one loaded pipeline. `allowed_origins` lets browser pages on those origins
    call the API (CORS; ["*"] for any)."""
    model_name = model_name or Path(pipe.checkpoint.path).name
    created = int(time.time())
    worker = ModelWorker(queue_size, timeout_s)
    sessions = SessionManager(pipe, SessionStore(sessions_db))
    pipe.set_progress_bar_config(disable=True)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="openbagel", version="0.1.0", description="OpenAI-compatible BAGEL server",
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    _install_error_handlers(app)
    v1 = APIRouter(prefix="/v1")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queued": worker.pending, "queue_size": worker.queue_size}

    card = P.ModelCard(id=model_name, created=created)

    @v1.get("/models", response_model=P.ModelList)
    async def models() -> P.ModelList:
        return P.ModelList(data=[card])

    @v1.get("/models/{model_id:path}", response_model=P.ModelCard)
    async def model(model_id: str) -> P.ModelCard:
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return card

    @v1.post("/images/generations", response_model=P.ImagesResponse, response_model_exclude_none=True)
    async def generations(body: P.ImageGenerationRequest, request: Request) -> P.ImagesResponse:
        try:
            height, width = body.height_width()
        except ValueError as exc:
            raise APIError(400, str(exc), param="size", code="invalid_size") from None
        tasks = [Task("generate", body.prompt, think=body.think, seed=s, height=height, width=width,
                      settings=body.settings) for s in _seeds(body.seed, body.n)]
        outs = await worker.call(request, lambda job: pipe.run(tasks, callback_on_step_end=job.check,
                                                                on_text=job.check))
        return _images_response(outs, body)

    @v1.post("/images/edits", response_model=P.ImagesResponse, response_model_exclude_none=True,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["image", "prompt"],
                 "properties": {"image": {"type": "string", "format": "binary"},
                                "mask": {"type": "string", "format": "binary"},
                                **P.ImageEditRequest.model_json_schema()["properties"]}}}}}})
    async def edits(request: Request) -> P.ImagesResponse:
        async with request.form(max_files=2, max_fields=64) as form:
            images = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
            masks = [v for k, v in form.multi_items() if k == "mask" and isinstance(v, UploadFile)]
            fields = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
            if not images:
                raise APIError(400, "send the image to edit as the multipart file field 'image'", param="image",
                               code="missing_image")
            if len(images) > 1:
                raise APIError(400, f"got {len(images)} images; BAGEL edits one image per request", param="image",
                               code="too_many_images")
            image_bytes = await images[0].read()
            mask_bytes = await masks[0].read() if masks else None
        body = P.ImageEditRequest.from_form(fields)
        image = open_image(image_bytes, name="image")
        alpha = read_mask(mask_bytes, image.size) if mask_bytes is not None else None
        tasks = [Task("edit", body.prompt, image, think=body.think, seed=s, settings=body.settings)
                 for s in _seeds(body.seed, body.n)]
        outs = await worker.call(request, lambda job: pipe.run(tasks, callback_on_step_end=job.check,
                                                                on_text=job.check))
        for out in outs:
            _at_input_size(out, image)
            if alpha is not None:
                out.images[0] = composite_by_mask(image, out.images[0], alpha)
        return _images_response(outs, body)

    @v1.post("/chat/completions", response_model=P.ChatCompletion)
    async def chat(body: P.ChatCompletionRequest, request: Request) -> Any:
        try:
            text = body.last_user_text()
            urls = body.image_urls()
            image = open_image(P.decode_data_url(urls[-1]), name="image") if urls else None
            height, width = body.height_width() if body.wants_image else (None, None)
        except ImageLoadError:
            raise
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        kind = ("edit" if image is not None else "generate") if body.wants_image else "understand"
        if kind == "edit":
            height = width = None  # an edit keeps the input's size
        tasks = [Task(kind, text, image, think=body.think, seed=s, height=height, width=width,
                      settings=body.settings) for s in _seeds(body.seed, body.n or 1)]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            if body.wants_image:
                raise APIError(400, "stream=true streams text answers; drop stream to receive an image",
                               param="stream", code="unsupported")
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await _stream_chat(pipe, worker, tasks[0], completion_id, model_name, include_usage)
        outs = await worker.call(request, lambda job: pipe.run(tasks, callback_on_step_end=job.check,
                                                                on_text=job.check))
        choices = []
        for index, out in enumerate(outs):
            if out.images:
                if image is not None:
                    _at_input_size(out, image)
                content: Any = [{"type": "image_url", "image_url": {"url": _image_data(out.images[0], "url").url}}]
            else:
                content = out.text
            message = P.AssistantMessage(content=content, reasoning_content=out.thought)
            choices.append(P.Choice(index=index, message=message, finish_reason=out.finish_reason or "stop"))
        usage = None
        if all(o.prompt_tokens is not None for o in outs):
            usage = P.Usage.of(outs[0].prompt_tokens, sum(o.completion_tokens for o in outs))  # one prompt, n answers
        return P.ChatCompletion(id=completion_id, model=model_name, choices=choices, usage=usage)

    # ----- sessions ----------------------------------------------------------------------------------

    @v1.post("/sessions", response_model=P.SessionResponse, status_code=201)
    async def create_session(body: P.SessionCreateRequest, request: Request) -> P.SessionResponse:
        try:
            image_bytes = P.decode_data_url(body.image)
        except ValueError as exc:
            raise APIError(400, str(exc), param="image", code="invalid_image") from None
        image = open_image(image_bytes, name="image")
        seed = _seeds(body.seed, 1)[0]
        record = await worker.call(request, lambda job: sessions.create(image, think=body.think, seed=seed,
                                                                         settings=body.settings))
        return _session_response(record)

    @v1.get("/sessions/{session_id}", response_model=P.SessionResponse)
    async def get_session(session_id: str) -> P.SessionResponse:
        record = await asyncio.to_thread(sessions.store.get, _session_id(session_id))
        return _session_response(record)

    @v1.post("/sessions/{session_id}/edits", response_model=P.SessionResponse)
    async def session_edit(session_id: str, body: P.SessionEditRequest, request: Request) -> P.SessionResponse:
        sid = _session_id(session_id)
        record = await worker.call(request, lambda job: sessions.edit(sid, body.prompt, body.seed, job.check,
                                                                       job.check))
        return _session_response(record)

    @v1.post("/sessions/{session_id}/undo", response_model=P.SessionResponse)
    async def session_undo(session_id: str, request: Request) -> P.SessionResponse:
        sid = _session_id(session_id)
        return _session_response(await worker.call(request, lambda job: sessions.undo(sid)))

    app.include_router(v1)
    app.state.worker, app.state.sessions = worker, sessions
    return app


async def _stream_chat(pipe: BagelPipeline, worker: ModelWorker, task: Task, completion_id: str,
                       model: str, include_usage: bool) -> StreamingResponse:
    """SSE chunks: the thought as `reasoning_content` deltas, the answer as `content` deltas, the finish
    reason, (with `include_usage`) a usage chunk, then [DONE].

    The response starts with the first decoded text, so input errors still come back as a plain 400.
    """
    created = int(time.time())
    loop = asyncio.get_running_loop()
    texts: asyncio.Queue[str | None] = asyncio.Queue()

    def run(job: Job) -> BagelOutput:
        def on_text(_: int, text: str) -> None:
            job.check()
            loop.call_soon_threadsafe(texts.put_nowait, text)

        try:
            return pipe.run([task], on_text=on_text)[0]
        finally:
            loop.call_soon_threadsafe(texts.put_nowait, None)

    job = worker.start(run)  # 429 here, before anything is sent
    deadline = time.monotonic() + worker.timeout_s

    async def next_text() -> str | None:
        try:
            return await asyncio.wait_for(texts.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise APIError(504, f"the request took longer than {worker.timeout_s:g} s", type="server_error",
                           code="timeout") from None

    try:
        first = await next_text()
        if first is None:
            await job.future  # raises the input error, if any, as a normal error response
    except BaseException:
        worker.release(job)
        raise

    def chunk(**delta: Any) -> str:
        finish = delta.pop("finish_reason", None)
        return _sse(P.ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[
            P.ChunkChoice(delta=P.Delta(**delta), finish_reason=finish)]))

    async def events() -> AsyncIterator[str]:
        sent_thought = sent_answer = ""
        text = first
        try:
            yield chunk(role="assistant", content="")
            while text is not None:
                thought, answer = P.split_partial(text)
                if len(thought) > len(sent_thought) and thought.startswith(sent_thought):
                    yield chunk(reasoning_content=thought[len(sent_thought):])
                    sent_thought = thought
                if len(answer) > len(sent_answer) and answer.startswith(sent_answer):
                    yield chunk(content=answer[len(sent_answer):])
                    sent_answer = answer
                text = await next_text()
            out = await job.future
            final = out.text or ""
            if final.startswith(sent_answer) and len(final) > len(sent_answer):
                yield chunk(content=final[len(sent_answer):])
            yield chunk(finish_reason=out.finish_reason or "stop")
            if include_usage and out.prompt_tokens is not None:
                yield _sse(P.ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[],
                                                 usage=P.Usage.of(out.prompt_tokens, out.completion_tokens)))
        except APIError as exc:
            yield _sse(exc.response().body.decode())
        except ValueError as exc:
            yield _sse(APIError(400, str(exc), code="invalid_value").response().body.decode())
        finally:
            worker.release(job)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def serve(pipe: BagelPipeline, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_options: Any) -> None:
    """Run the server with uvicorn (blocking). Bind 0.0.0.0 only on purpose, e.g. inside a container.

    On SIGTERM / Ctrl-C it stops accepting, gives running requests SHUTDOWN_GRACE_S to finish, then
    cancels them (at the next denoising step or token): inside `docker stop`'s 10 s before SIGKILL.
    """
    import uvicorn

    app = create_app(pipe, **app_options)
    queue = app.state.worker.queue_size
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=max(64, 4 * queue),
                timeout_keep_alive=30, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
