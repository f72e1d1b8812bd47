"""An OpenAI-compatible chat server for a vlmkit model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions (text and `image_url` parts, SSE streaming), GET
/v1/models, GET /health, and a small web page at /.

Every request is checked before it reaches the model, and every way it can be wrong answers
with a 4xx and an OpenAI-style error body: the body is read with a byte cap (a client cannot
make the server buffer gigabytes), JSON and fields are validated, images must be `data:` URIs
unless remote fetching was switched on, and decoded images go through the same pixel and
aspect-ratio guards as training data, in worker threads (never on the event loop). Only then
is a job queued for the batcher.

A server without an API key answers only requests whose Host is an allowed host (loopback
names by default) and whose Origin, when a browser sends one, is the server itself or an
allowed origin: a web page elsewhere cannot reach it with a cross-site POST or through DNS
rebinding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from html import escape
import json
import logging
import re
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Callable, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.data.formats import BadRecordError, Message
from vlmkit.generate import GenerationConfig
from vlmkit.processing.images import ImageLoadError, image_formats, load_image
from vlmkit.processing.prompt import IMAGE_PLACEHOLDER
from vlmkit.serve.batching import DynamicBatcher, Job, QueueFull


@dataclass
class ServerSettings:
    model_name: str = "vlmkit"
    api_key: str | None = None
    allow_remote_images: bool = False
    max_request_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    max_images: int = 8
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 1024
    remote_timeout_s: float = 10.0
    # Seconds a client has to send the whole request body once its headers arrived; a body left
    # unfinished gets a 408 and the connection is closed.
    body_timeout_s: float = 30.0
    # Compile the decode step (GenerationConfig.compile): a CUDA graph per power-of-two batch size.
    compile_decode: bool = False
    # Pillow formats a request's images may be in (None: images.DEFAULT_IMAGE_FORMATS).
    image_formats: list[str] | None = None
    # Threads that decode request images, off the event loop.
    decode_workers: int = 2
    # Without an API key: Host names (no port) and browser Origins that may reach the server;
    # "*" allows any. The loopback names are always allowed hosts.
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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


def _clip(text: str, limit: int = 100) -> str:
    """A client's value as an error message may quote it: its first `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


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


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def parse_data_uri(url: str, limit: int) -> bytes:
    m = _DATA_URI.match(url)
    if m is None:
        raise APIError(400, "image_url is not a valid data: URI (expected data:image/...;base64,...)", "messages", "invalid_image_url")
    if not m.group("b64"):
        raise APIError(400, "image data URIs must be base64-encoded (data:image/png;base64,...)", "messages", "invalid_image_url")
    mime = m.group("mime")
    if mime and not mime.startswith("image/"):
        raise APIError(400, f"data URI has media type {_clip(mime)!r}, not an image", "messages", "invalid_image_url")
    payload = re.sub(r"\s+", "", m.group("data"))
    if len(payload) * 3 // 4 > limit:
        raise APIError(413, f"image data is larger than the limit of {limit:,} bytes", "messages", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image data URI is not valid base64", "messages", "invalid_image_url") from None


class TextAssembler:
    """Token ids -> text deltas for streaming.

    Decoding the whole answer each time (not token by token) keeps multi-token characters and
    tokenizer spacing right; a delta ending in U+FFFD is an incomplete UTF-8 sequence and is
    held back, and so is any tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.text()
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, self.sent)
        delta = text[self.sent : end]
        self.sent = end
        return delta


# ---- the application ---------------------------------------------------------------------------


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Pillow and the tokenizers sometimes put object reprs in messages; a client gains nothing from them.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
# top_p values below this keep only the most likely token, as this value does; much smaller ones
# round to 0 in float32 and would drop every token.
MIN_TOP_P = 1e-6
log = logging.getLogger("vlmkit.serve")


def _host_name(host_header: str) -> str:
    """The host part of a Host header: "[::1]:8000" -> "::1", "Example.COM:80" -> "example.com"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _has_lone_surrogate(body: Any) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def create_app(model, processor, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    batcher = DynamicBatcher(model, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.max_queue)
    # One thread encodes prompts: fast tokenizers are not safe to share across threads.
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmkit-encode")
    # Images decode on their own threads: a large image must not stall /health or other requests.
    decoder = ThreadPoolExecutor(max_workers=max(1, settings.decode_workers), thread_name_prefix="vlmkit-decode")
    formats = image_formats(settings.image_formats)
    tokenizer = model.tokenizer
    # The image token itself is a special token: typed by a user it would tokenise as one.
    forbidden_text = {model.config.image_token}
    allowed_hosts = {h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, *settings.allowed_hosts)}
    allowed_origins = {o.lower().rstrip("/") for o in settings.allowed_origins}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            encoder.shutdown(wait=False, cancel_futures=True)
            decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        elif exc.status == 408:
            headers = {"Connection": "close"}  # the rest of the body may still come: no keep-alive
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        # A bug, not a bad request: the traceback goes to the log, the client gets no internals.
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error", code="internal_error"), status_code=500)

    def check_site(request: Request) -> None:
        """Without an API key, only the allowed hosts and same-site (or allowed) browser origins."""
        if settings.api_key is not None:
            return
        host_header = request.headers.get("host", "")
        if "*" not in allowed_hosts and _host_name(host_header) not in allowed_hosts:
            raise APIError(403, "this Host is not allowed (a server without an API key answers only its allowed hosts; "
                           "start it with --allowed-host NAME)", code="host_not_allowed", kind="permission_error")
        origin = request.headers.get("origin")
        if origin is None or "*" in allowed_origins:
            return
        origin = origin.lower().rstrip("/")
        if origin not in allowed_origins and origin not in (f"http://{host_header.lower()}", f"https://{host_header.lower()}"):
            raise APIError(403, "cross-origin requests are not allowed (start the server with --allowed-origin ORIGIN, "
                           "or with --api-key)", code="origin_not_allowed", kind="permission_error")

    def check_key(request: Request) -> None:
        check_site(request)
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key", kind="authentication_error")

    async def read_body(request: Request) -> Any:
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
        try:
            body = json.loads(b"".join(chunks))
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

    def parse_request(body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as e:
            # A content list that fails also fails the plain-string branch of the union; the
            # error that went deepest names what is actually wrong.
            worst = max(e.errors(), key=lambda err: len(err["loc"]))
            where = _clip(_where(worst["loc"]))
            if worst["type"] == "extra_forbidden":
                raise APIError(400, f"Unrecognized request argument supplied: {where}", where, "unknown_parameter") from None
            raise APIError(400, f"invalid request: {where}: {_clip(worst['msg'], 300)}", where or None) from None
        if req.model != settings.model_name:
            raise APIError(404, f"model {_clip(req.model)!r} is not served here; this server serves {settings.model_name!r}",
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
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")
        return req

    def fetch_remote(url: str) -> bytes:
        limit = settings.max_request_bytes
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "vlmkit"}), timeout=settings.remote_timeout_s) as r:
                data = r.read(limit + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise APIError(400, f"could not fetch image {_clip(url)!r}: {_clip(str(e), 200)}", "messages", "image_fetch_failed") from None
        if len(data) > limit:
            raise APIError(413, f"remote image is larger than {limit:,} bytes", "messages", "image_too_large")
        return data

    def requested_max_tokens(req: ChatRequest) -> int:
        # 0 is not "unset": parse_request refused it; the newer field wins when both are sent.
        if req.max_completion_tokens is not None:
            return req.max_completion_tokens
        if req.max_tokens is not None:
            return req.max_tokens
        return min(settings.default_max_tokens, settings.max_tokens_limit)

    async def load_part_image(url: str):
        if url.startswith("data:"):
            data = parse_data_uri(url, settings.max_request_bytes)
        elif url.startswith(("http://", "https://")):
            if not settings.allow_remote_images:
                raise APIError(400, "remote image URLs are disabled on this server; send the image as a data: URI "
                               "(or start the server with --allow-remote-images)", "messages", "remote_images_disabled")
            data = await asyncio.to_thread(fetch_remote, url)
        else:
            raise APIError(400, "image_url must be a data: URI" + (" or an http(s) URL" if settings.allow_remote_images else ""), "messages", "invalid_image_url")
        try:
            return await asyncio.get_running_loop().run_in_executor(decoder, decode_image, data)
        except ImageLoadError as e:
            raise APIError(400, f"unusable image: {_OBJECT_REPR.sub('the image', str(e))}", "messages", "invalid_image") from None

    def decode_image(data: bytes):
        return load_image(data, max_pixels=settings.max_image_pixels, formats=formats)

    async def to_conversation(req: ChatRequest, marker: str) -> tuple[list[Message], list]:
        """The request as messages; each image part becomes `marker` (see `encode`)."""
        messages, images = [], []
        for k, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
            pieces = []
            for part in parts:
                if isinstance(part, TextPart):
                    if any(t in part.text for t in forbidden_text):
                        raise APIError(400, f"messages[{k}]: text may not contain the model's image token {model.config.image_token!r}; "
                                       "send images as image_url parts", f"messages.{k}.content")
                    pieces.append(part.text)
                else:
                    if role != "user":
                        raise APIError(400, f"messages[{k}]: only user messages may hold images", f"messages.{k}.content")
                    if len(images) >= settings.max_images:
                        raise APIError(400, f"at most {settings.max_images} images per request", f"messages.{k}.content")
                    images.append(await load_part_image(part.image_url.url))
                    pieces.append(marker)
            messages.append(Message(role, "\n".join(pieces)))
        if messages[-1].role == "assistant":
            raise APIError(400, "the last message must not be an assistant message (continuing a reply is not supported)", "messages")
        return messages, images

    def encode(messages: list[Message], images: list, placeholders: re.Pattern):
        try:
            return processor.encode_prompt(messages, images, placeholder_re=placeholders)
        except BadRecordError as e:
            message = str(e).replace("record 'prompt': ", "the prompt ")
            raise APIError(400, _OBJECT_REPR.sub("an object", message), "messages", "invalid_prompt") from None
        except jinja2.TemplateError as e:  # e.g. a template that insists on alternating roles
            raise APIError(400, f"the model's chat template refuses this conversation: {e}", "messages", "invalid_prompt") from None

    # ---- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        # Open to any Host: load balancers and probes address the server by its IP.
        body = {"status": "ok" if batcher.healthy else "error", "model": settings.model_name, "waiting": batcher.waiting, **batcher.stats}
        if batcher.error is not None:
            body["error"] = f"{type(batcher.error).__name__}: {batcher.error}"
        return JSONResponse(body, status_code=200 if batcher.healthy else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "vlmkit"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        check_site(request)
        html = resources.files("vlmkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(settings.model_name)), headers={
            # The page talks to this server only and loads nothing from elsewhere.
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'",
        })

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_request(await read_body(request))
        # A user's text is literal: images are marked with a per-request marker no client can
        # know in advance, so "<video>" or "<image_2>" in a question stays text.
        nonce = uuid.uuid4().hex
        messages, images = await to_conversation(req, f"<{IMAGE_PLACEHOLDER[1:-1]}:{nonce}>")
        placeholders = re.compile(rf"<(image|video)(?:_(\d+))?:{nonce}>")
        prompt = await asyncio.get_running_loop().run_in_executor(encoder, encode, messages, images, placeholders)
        max_tokens = requested_max_tokens(req)
        gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=req.temperature > 0, temperature=req.temperature or 1.0,
                               top_p=max(req.top_p, MIN_TOP_P), seed=req.seed, compile=settings.compile_decode)
        job = Job(prompt=prompt, gen=gen, max_new_tokens=max_tokens, loop=asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}; retry later", code="overloaded", kind="server_error") from None
        except RuntimeError as e:
            raise APIError(503, str(e), code="unavailable", kind="server_error") from None
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = len(prompt.input_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream_events(job, TextAssembler(tokenizer, stops), completion_id, created, prompt_tokens, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, reason, count = await collect(job, TextAssembler(tokenizer, stops))
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count, "total_tokens": prompt_tokens + count},
        }

    async def collect(job: Job, assembler: TextAssembler) -> tuple[str, str, int]:
        parts, count = [], 0
        try:
            while True:
                event = await job.events.get()
                if event.kind == "token":
                    count += 1
                    parts.append(assembler.add(event.token))
                    if assembler.stopped:
                        job.cancelled = True
                        return "".join(parts), "stop", count
                elif event.kind == "done":
                    parts.append(assembler.finish())
                    return "".join(parts), event.reason or "stop", count
                else:
                    raise APIError(500, event.reason or "generation failed", code="generation_failed", kind="server_error")
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def chunk(completion_id: str, created: int, delta: dict, reason: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def stream_events(job: Job, assembler: TextAssembler, completion_id: str, created: int, prompt_tokens: int, include_usage: bool):
        count = 0
        try:
            yield chunk(completion_id, created, {"role": "assistant", "content": ""})
            reason = "stop"
            while True:
                event = await job.events.get()
                if event.kind == "token":
                    count += 1
                    delta = assembler.add(event.token)
                    if delta:
                        yield chunk(completion_id, created, {"content": delta})
                    if assembler.stopped:
                        job.cancelled = True
                        break
                elif event.kind == "done":
                    reason = event.reason or "stop"
                    tail = assembler.finish()
                    if tail:
                        yield chunk(completion_id, created, {"content": tail})
                    break
                else:
                    # Headers are already sent: the error travels in the stream, as OpenAI does.
                    yield f"data: {json.dumps(error_body(event.reason or 'generation failed', 'server_error'))}\n\n"
                    return
            yield chunk(completion_id, created, {}, reason)
            if include_usage:
                yield chunk(completion_id, created, {}, usage={"prompt_tokens": prompt_tokens, "completion_tokens": count, "total_tokens": prompt_tokens + count}, choices=False)
            yield "data: [DONE]\n\n"
        finally:
            # Also reached when the client disconnects mid-stream: free its batch row.
            job.cancelled = True

    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", sock=None) -> None:
    """`sock`: a socket the caller already bound (uvicorn then serves on it instead of binding)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)

