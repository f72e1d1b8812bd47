"""A chat request from bytes to an encoded prompt, with every check on the way.

The body is read with a byte cap and a time limit, validated against OpenAI's chat schema
(fields this server does not implement are accepted only with values that ask for nothing
more), and its image parts are decoded in worker threads, never on the event loop, through the
same pixel and aspect-ratio guards as training data. Anything wrong is an `APIError` (a 4xx).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import urllib.error
import urllib.request
from typing import Annotated, Any, Callable, Literal

import jinja2
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmkit.data.formats import BadRecordError, Message
from vlmkit.generate import GenerationConfig
from vlmkit.processing.images import ImageLoadError, load_image
from vlmkit.processing.prompt import IMAGE_PLACEHOLDER, EncodedSample
from vlmkit.serve.errors import OBJECT_REPR, APIError, clip
from vlmkit.serve.state import ServerSettings, ServerState

# top_p values below this keep only the most likely token, as this value does; much smaller ones
# round to 0 in float32 and would drop every token.
MIN_TOP_P = 1e-6


# ---- request schema ----------------------------------------------------------------------------
# Every field of OpenAI's chat API is known and typed, and nothing else is accepted: a field this
# server would silently ignore is refused by name, as OpenAI refuses an argument it does not know
# (clients such as the `openai` package send only the fields their caller gave). Fields it does
# not implement are accepted only with values that ask for nothing beyond what it does anyway
# (UNSUPPORTED below).


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    # OpenAI's other message fields; clients replaying an assistant message send them empty.
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict] | None = None
    function_call: dict | None = None
    audio: dict | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # no effect: this server adds no padding to chunks


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    # Any 64-bit seed torch's generator takes.
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not implemented: see UNSUPPORTED for the values accepted.
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None
    function_call: Literal["none", "auto"] | dict | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Bookkeeping for the caller's side; they change nothing in the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else (self.stop or [])


def _never(value) -> bool:
    return False


# Field -> (does this value ask for nothing beyond what the server does?, the values accepted).
# null always means "not set". Paths name message fields as `messages.K.<name>`.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (lambda v: v == 0, "0"),
    "presence_penalty": (lambda v: v == 0, "0"),
    "logit_bias": (lambda v: not v, "{}"),
    "logprobs": (lambda v: v is False, "false"),
    "top_logprobs": (_never, "null"),
    "response_format": (lambda v: v.type == "text", '{"type": "text"}'),
    "tools": (lambda v: not v, "[]"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" or "auto" (there are no tools)'),
    # Only meaningful with tools, which are refused.
    "parallel_tool_calls": (lambda v: True, "true or false"),
    "functions": (lambda v: not v, "[]"),
    "function_call": (lambda v: v in ("none", "auto"), '"none" or "auto" (there are no functions)'),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "audio": (_never, "null"),
    "prediction": (_never, "null"),
    "reasoning_effort": (_never, "null"),
    "verbosity": (lambda v: v == "medium", '"medium"'),
    "web_search_options": (_never, "null"),
    "store": (lambda v: v is False, "false (nothing is stored)"),
    "service_tier": (lambda v: v in ("auto", "default"), '"auto" or "default"'),
}
UNSUPPORTED_IN_MESSAGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_never, "null"),
    "refusal": (_never, "null"),
    "tool_calls": (lambda v: not v, "[]"),
    "function_call": (_never, "null"),
    "audio": (_never, "null"),
}


def _unsupported(model: BaseModel, table: dict, prefix: str = "") -> None:
    for name, (harmless, accepted) in table.items():
        value = getattr(model, name)
        if value is not None and not harmless(value):
            raise APIError(400, f"Unsupported parameter: {prefix}{name} is not supported by this server; it accepts only "
                           f"{accepted}, or leaving it out", prefix + name, "unsupported_parameter")


def _where(loc: tuple) -> str:
    """A pydantic error location as the client wrote it: without union-branch labels
    ("str", "list[...]") or the repeated discriminator tag ("image_url.image_url.url")."""
    parts: list[str] = []
    for p in loc:
        p = str(p)
        if p == "str" or p.startswith(("list[", "tagged-union[")):
            continue
        if parts and parts[-1] == p and not p.isdigit():
            continue
        parts.append(p)
    return ".".join(parts)


# ---- the body and its fields -------------------------------------------------------------------


async def read_body(request: Request, settings: ServerSettings) -> Any:
    """The request body as JSON, read within the byte cap and the time limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_request_bytes:
        raise APIError(413, f"request body is {int(declared):,} bytes, above the limit of {settings.max_request_bytes:,}", code="request_too_large")
    chunks, size = [], 0
    try:
        # Without a bound, a client that never finishes its body (a chunked body with no last
        # chunk, a Content-Length never reached) holds its connection and handler forever.
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_request_bytes:
                    raise APIError(413, f"request body is above the limit of {settings.max_request_bytes:,} bytes", code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"request body not received in full within {settings.body_timeout_s:g} s", code="request_timeout") from None
    return _parse_json(b"".join(chunks))


def _parse_json(data: bytes) -> Any:
    try:
        body = json.loads(data)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # also UnicodeDecodeError, and integers longer than Python converts
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    try:
        surrogate = _has_lone_surrogate(body)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if surrogate:
        raise APIError(400, "request body holds a lone UTF-16 surrogate (such as \\ud800), which is not text", code="invalid_json")
    return body


def _has_lone_surrogate(body: Any) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_request(body: Any, settings: ServerSettings) -> ChatRequest:
    """The JSON body as a `ChatRequest`, checked against the schema and this server's limits."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        # A content list that fails also fails the plain-string branch of the union; the
        # error that went deepest names what is actually wrong.
        worst = max(e.errors(), key=lambda err: len(err["loc"]))
        where = clip(_where(worst["loc"]))
        if worst["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {where}", where, "unknown_parameter") from None
        raise APIError(400, f"invalid request: {where}: {clip(worst['msg'], 300)}", where or None) from None
    if req.model != settings.model_name:
        raise APIError(404, f"model {clip(req.model)!r} is not served here; this server serves {settings.model_name!r}",
                       "model", "model_not_found")
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    _unsupported(req, UNSUPPORTED)
    for k, message in enumerate(req.messages):
        _unsupported(message, UNSUPPORTED_IN_MESSAGES, f"messages.{k}.")
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name)
        if value is not None and not 1 <= value <= settings.max_tokens_limit:
            raise APIError(400, f"{name} must be between 1 and {settings.max_tokens_limit}, got {value}", name)
    if len(req.stops()) > 4:
        raise APIError(400, "at most 4 stop sequences", "stop")
    return req


def requested_max_tokens(req: ChatRequest, settings: ServerSettings) -> int:
    # 0 is not "unset": parse_request refused it; the newer field wins when both are sent.
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens
    if req.max_tokens is not None:
        return req.max_tokens
    return min(settings.default_max_tokens, settings.max_tokens_limit)


def generation_config(req: ChatRequest, max_tokens: int, settings: ServerSettings) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_tokens, do_sample=req.temperature > 0, temperature=req.temperature or 1.0,
                            top_p=max(req.top_p, MIN_TOP_P), seed=req.seed, compile=settings.compile_decode)


# ---- images ------------------------------------------------------------------------------------


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def parse_data_uri(url: str, limit: int) -> bytes:
    m = _DATA_URI.match(url)
    if m is None:
        raise APIError(400, "image_url is not a valid data: URI (expected data:image/...;base64,...)", "messages", "invalid_image_url")
    if not m.group("b64"):
        raise APIError(400, "image data URIs must be base64-encoded (data:image/png;base64,...)", "messages", "invalid_image_url")
    mime = m.group("mime")
    if mime and not mime.startswith("image/"):
        raise APIError(400, f"data URI has media type {clip(mime)!r}, not an image", "messages", "invalid_image_url")
    payload = re.sub(r"\s+", "", m.group("data"))
    if len(payload) * 3 // 4 > limit:
        raise APIError(413, f"image data is larger than the limit of {limit:,} bytes", "messages", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image data URI is not valid base64", "messages", "invalid_image_url") from None


def fetch_remote(url: str, settings: ServerSettings) -> bytes:
    limit = settings.max_request_bytes
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "vlmkit"}), timeout=settings.remote_timeout_s) as r:
            data = r.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(400, f"could not fetch image {clip(url)!r}: {clip(str(e), 200)}", "messages", "image_fetch_failed") from None
    if len(data) > limit:
        raise APIError(413, f"remote image is larger than {limit:,} bytes", "messages", "image_too_large")
    return data


def _decode_image(data: bytes, max_pixels: int, formats: tuple[str, ...]):
    return load_image(data, max_pixels=max_pixels, formats=formats)


async def load_part_image(url: str, state: ServerState):
    """The image of an `image_url` part, fetched if allowed, decoded on a decoder thread."""
    settings = state.settings
    if url.startswith("data:"):
        data = parse_data_uri(url, settings.max_request_bytes)
    elif url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled on this server; send the image as a data: URI "
                           "(or start the server with --allow-remote-images)", "messages", "remote_images_disabled")
        data = await asyncio.to_thread(fetch_remote, url, settings)
    else:
        raise APIError(400, "image_url must be a data: URI" + (" or an http(s) URL" if settings.allow_remote_images else ""), "messages", "invalid_image_url")
    try:
        return await asyncio.get_running_loop().run_in_executor(
            state.decoder, _decode_image, data, settings.max_image_pixels, state.image_formats)
    except ImageLoadError as e:
        raise APIError(400, f"unusable image: {OBJECT_REPR.sub('the image', str(e))}", "messages", "invalid_image") from None


# ---- the prompt --------------------------------------------------------------------------------


async def to_conversation(req: ChatRequest, marker: str, state: ServerState) -> tuple[list[Message], list]:
    """The request as messages; each image part becomes `marker` (see `encode_request`)."""
    messages, images = [], []
    for k, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        pieces = []
        for part in parts:
            if isinstance(part, TextPart):
                # The image token itself is a special token: typed by a user it would tokenise as one.
                if state.image_token in part.text:
                    raise APIError(400, f"messages[{k}]: text may not contain the model's image token {state.image_token!r}; "
                                   "send images as image_url parts", f"messages.{k}.content")
                pieces.append(part.text)
            else:
                if role != "user":
                    raise APIError(400, f"messages[{k}]: only user messages may hold images", f"messages.{k}.content")
                if len(images) >= state.settings.max_images:
                    raise APIError(400, f"at most {state.settings.max_images} images per request", f"messages.{k}.content")
                images.append(await load_part_image(part.image_url.url, state))
                pieces.append(marker)
        messages.append(Message(role, "\n".join(pieces)))
    if messages[-1].role == "assistant":
        raise APIError(400, "the last message must not be an assistant message (continuing a reply is not supported)", "messages")
    return messages, images


def _encode(processor, messages: list[Message], images: list, placeholders: re.Pattern) -> EncodedSample:
    try:
        return processor.encode_prompt(messages, images, placeholder_re=placeholders)
    except BadRecordError as e:
        message = str(e).replace("record 'prompt': ", "the prompt ")
        raise APIError(400, OBJECT_REPR.sub("an object", message), "messages", "invalid_prompt") from None
    except jinja2.TemplateError as e:  # e.g. a template that insists on alternating roles
        raise APIError(400, f"the model's chat template refuses this conversation: {e}", "messages", "invalid_prompt") from None


async def encode_request(req: ChatRequest, state: ServerState, nonce: str) -> EncodedSample:
    """The request's prompt, encoded on the encoder thread.

    A user's text is literal: images are marked with a per-request `nonce` no client can know in
    advance, so "<video>" or "<image_2>" in a question stays text.
    """
    messages, images = await to_conversation(req, f"<{IMAGE_PLACEHOLDER[1:-1]}:{nonce}>", state)
    placeholders = re.compile(rf"<(image|video)(?:_(\d+))?:{nonce}>")
    return await asyncio.get_running_loop().run_in_executor(state.encoder, _encode, state.processor, messages, images, placeholders)
