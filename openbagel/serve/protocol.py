"""Wire formats of the OpenAI-compatible server (pydantic), and the limits it enforces.

Only shapes live here: requests, responses and error objects, plus small pure helpers that turn a
request into pipeline arguments. BAGEL's sampler settings travel as extra top-level fields (like
vLLM-Omni and stable-diffusion.cpp's server); they are collected into `settings` and checked by
`openbagel.inference.settings.resolve`, so every surface shares one list of names and one set of
error messages. The routes are in `server.py`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from ..inference.pipeline import split_thought
from .wire import MAX_IMAGES_PER_REQUEST, MAX_MESSAGES, parse_size

OUTPUT_FORMATS = ("png", "jpeg", "webp")

# OpenAI fields that are accepted and have no meaning for BAGEL (documented in docs/serving.md).
IGNORED_IMAGE_FIELDS = ("model", "quality", "style", "user", "background", "moderation", "output_compression",
                        "input_fidelity", "partial_images")
IGNORED_CHAT_FIELDS = ("model", "user", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                       "top_logprobs", "metadata", "store", "service_tier", "audio", "reasoning_effort",
                       "parallel_tool_calls", "response_format")
# OpenAI fields that ask for something BAGEL cannot do: refused with a message that says so.
UNSUPPORTED_CHAT_FIELDS = {"tools": "tool (function) calling", "tool_choice": "tool (function) calling",
                           "functions": "function calling", "function_call": "function calling",
                           "prediction": "predicted outputs", "web_search_options": "web search"}


class _Request(BaseModel):
    """Extra fields are BAGEL sampler settings (cfg_text_scale, num_inference_steps, ...)."""

    model_config = ConfigDict(extra="allow")
    IGNORED: ClassVar[tuple[str, ...]] = ()

    seed: int | None = Field(None, ge=0, lt=2**63, description="random seed (random when omitted)")
    think: StrictBool = Field(False, description="let the model write a thought before it answers or draws")

    @property
    def settings(self) -> dict[str, Any]:
        """The sampler settings: every extra field that is not an ignored OpenAI field."""
        return {k: v for k, v in (self.model_extra or {}).items() if k not in self.IGNORED}

    @classmethod
    def from_form(cls, fields: list[tuple[str, str]]) -> _Request:
        """Validate multipart text fields: values arrive as text ('3', 'true', '[0.4, 1.0]'); a list may also
        come as repeated `name[]` fields, the way the openai client and HTML forms send one."""
        values: dict[str, Any] = {}
        for key, text in fields:
            if key.endswith("[]"):
                items = values.setdefault(key[:-2], [])
                if not isinstance(items, list):
                    raise ValueError(f"{key[:-2]} was sent both as {key[:-2]!r} and as {key!r}; send one of them")
                items.append(_form_value(text))
            else:
                values[key] = text if key in cls.model_fields else _form_value(text)
        return cls.model_validate(values)


class ImageGenerationRequest(_Request):
    IGNORED = IGNORED_IMAGE_FIELDS

    prompt: str = Field(..., description="what to draw")
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(None, description="WxH in pixels, or 'auto' for the model's default size")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="'url' returns a data: URL (the server stores no files)")
    output_format: Literal["png", "jpeg", "webp"] = "png"

    def height_width(self) -> tuple[int | None, int | None]:
        return parse_size(self.size)


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of the multipart edit request (the files are read separately)."""

    @field_validator("size")
    @classmethod
    def _size_is_the_input(cls, value: str | None) -> str | None:
        if value not in (None, "auto"):
            raise ValueError("an edit keeps the size of the input image; leave size out or use 'auto'")
        return value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]
    output_format: str = "png"
    size: str
    thoughts: list[str | None] | None = Field(None, description="the model's thoughts (think mode)")


# ----- chat ------------------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    text: str | None = None
    image_url: ImageURL | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in ("text", "image_url"):
            raise ValueError(f"content parts of type {value!r} are not supported; use 'text' and 'image_url'")
        return value

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value  # vLLM accepts the URL as a bare string

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url': {'url': 'data:image/png;base64,...'}")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> Any:
        """Check a list of parts here, so a bad part is reported as itself and not as 'not a string'."""
        if not isinstance(value, list):
            return value
        try:
            return [ContentPart.model_validate(part) for part in value]
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(first["msg"].removeprefix("Value error, ")) from None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Request):
    """Answers the last user message with the latest image of the conversation (see docs/serving.md)."""

    IGNORED = IGNORED_CHAT_FIELDS

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_IMAGES_PER_REQUEST, description="choices (default 1), with seeds "
                          "seed, seed + 1, ...")
    modalities: list[Literal["text", "image"]] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    size: str | None = None

    def height_width(self) -> tuple[int | None, int | None]:
        return parse_size(self.size)

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        for name, what in UNSUPPORTED_CHAT_FIELDS.items():
            if (self.model_extra or {}).get(name) is not None:
                raise ValueError(f"{name}: {what} is not supported by this server; leave {name!r} out")
        if self.stream and (self.n or 1) > 1:
            raise ValueError("n: stream=true sends one choice; leave n out or drop stream")
        return self

    @property
    def wants_image(self) -> bool:
        return "image" in (self.modalities or [])

    def last_user_text(self) -> str:
        for m in reversed(self.messages):
            if m.role == "user":
                if isinstance(m.content, str):
                    return m.content
                return "\n".join(p.text for p in m.content or [] if p.type == "text" and p.text)
        raise ValueError("the conversation has no user message")

    def image_urls(self) -> list[str]:
        return [p.image_url.url for m in self.messages if isinstance(m.content, list)
                for p in m.content if p.type == "image_url" and p.image_url]

    @property
    def settings(self) -> dict[str, Any]:
        """OpenAI's sampling fields mapped onto BAGEL's names, plus the extra BAGEL fields."""
        out = super().settings
        tokens = self.max_completion_tokens or self.max_tokens
        if tokens is not None:
            out["max_think_token_n"] = tokens
        if self.temperature is not None:
            out["do_sample"] = self.temperature > 0
            if self.temperature > 0:
                out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        return out


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | list[dict[str, Any]] | None
    reasoning_content: str | None = None  # the thought (think mode), as vLLM and DeepSeek name it


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = "stop"


class Usage(BaseModel):
    """Tokens read (the prompt, image tokens included) and written (the thought included)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ----- sessions (multi-turn editing; not an OpenAI API) ------------------------------------------------


class SessionCreateRequest(_Request):
    image: str = Field(..., description="the starting image as a data URL (data:image/png;base64,...)")


class SessionEditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="the edit instruction; it applies to the session's latest image")
    seed: int | None = Field(None, ge=0, lt=2**63, description="default: session seed + turn number")


class TurnInfo(BaseModel):
    index: int
    instruction: str
    seed: int
    thought: str | None = None


class SessionResponse(BaseModel):
    id: str
    object: Literal["session"] = "session"
    created: int
    think: bool
    seed: int
    settings: dict[str, Any]
    turns: list[TurnInfo]
    image: ImageData = Field(..., description="the latest image (the source before the first turn)")


# ----- models, errors --------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openbagel"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ----- helpers ---------------------------------------------------------------------------------------

DATA_URL_RE = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(.*)$", re.DOTALL)


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 image data URL. Remote URLs are refused: the server never fetches anything."""
    m = DATA_URL_RE.match(url)
    if not m:
        if url.startswith(("http://", "https://")):
            raise ValueError("image URLs are not fetched; send the image inline as data:image/png;base64,...")
        raise ValueError("an image must be a data URL: data:image/png;base64,...")
    try:
        return base64.b64decode(m.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data URL is not valid base64") from None


def _form_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_partial(text: str) -> tuple[str, str]:
    """(thought so far, answer so far) of a partly decoded text; a thought is a leading '<think>...</think>',
    asked for or not, so the answer never carries the tags."""
    body = text.lstrip()
    if len(body) < len("<think>") and "<think>".startswith(body):  # '<', '<th': maybe a thought; wait and see
        return "", ""
    thought, answer = split_thought(text)
    return thought or "", answer
