"""The endpoints: POST /v1/chat/completions, GET /v1/models, GET /health and the web page at /.

A server without an API key answers only requests whose Host is an allowed host (loopback
names by default) and whose Origin, when a browser sends one, is the server itself or an
allowed origin: a web page elsewhere cannot reach it with a cross-site POST or through DNS
rebinding.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from html import escape
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from vlmkit.serve.batching import Job, QueueFull
from vlmkit.serve.errors import APIError
from vlmkit.serve.parsing import ChatRequest, encode_request, generation_config, parse_request, read_body, requested_max_tokens
from vlmkit.serve.state import ServerState, server_state
from vlmkit.serve.streaming import Completion, TextAssembler, collect, stream_events

# Dependencies are coroutines: FastAPI would run plain functions on its thread pool.
State = Annotated[ServerState, Depends(server_state)]
router = APIRouter()


def _host_name(host_header: str) -> str:
    """The host part of a Host header: "[::1]:8000" -> "::1", "Example.COM:80" -> "example.com"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def check_site(request: Request, state: State) -> None:
    """Without an API key, only the allowed hosts and same-site (or allowed) browser origins."""
    if state.settings.api_key is not None:
        return
    host_header = request.headers.get("host", "")
    if "*" not in state.allowed_hosts and _host_name(host_header) not in state.allowed_hosts:
        raise APIError(403, "this Host is not allowed (a server without an API key answers only its allowed hosts; "
                       "start it with --allowed-host NAME)", code="host_not_allowed", kind="permission_error")
    origin = request.headers.get("origin")
    if origin is None or "*" in state.allowed_origins:
        return
    origin = origin.lower().rstrip("/")
    if origin not in state.allowed_origins and origin not in (f"http://{host_header.lower()}", f"https://{host_header.lower()}"):
        raise APIError(403, "cross-origin requests are not allowed (start the server with --allowed-origin ORIGIN, "
                       "or with --api-key)", code="origin_not_allowed", kind="permission_error")


async def check_key(request: Request, state: State) -> None:
    await check_site(request, state)
    api_key = state.settings.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key", kind="authentication_error")


@router.get("/health")
async def health(state: State):
    # Open to any Host: load balancers and probes address the server by its IP.
    batcher = state.batcher
    body = {"status": "ok" if batcher.healthy else "error", "model": state.settings.model_name, "waiting": batcher.waiting, **batcher.stats}
    if hasattr(batcher, "cache_stats"):
        body.update(batcher.cache_stats())
    if batcher.error is not None:
        body["error"] = f"{type(batcher.error).__name__}: {batcher.error}"
    return JSONResponse(body, status_code=200 if batcher.healthy else 503)


@router.get("/v1/models", dependencies=[Depends(check_key)])
async def models(state: State):
    return {"object": "list", "data": [{"id": state.settings.model_name, "object": "model", "created": 0, "owned_by": "vlmkit"}]}


@router.get("/", response_class=HTMLResponse, dependencies=[Depends(check_site)])
async def page(state: State):
    html = resources.files("vlmkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(html.replace("{{MODEL}}", escape(state.settings.model_name)), headers={
        # The page talks to this server only and loads nothing from elsewhere.
        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'",
    })


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)])
async def chat_completions(request: Request, state: State):
    req = parse_request(await read_body(request, state.settings), state.settings)
    prompt = await encode_request(req, state, nonce=uuid.uuid4().hex)
    job = _submit(state, req, prompt)
    completion = Completion(id="chatcmpl-" + uuid.uuid4().hex[:24], created=int(time.time()),
                            model=state.settings.model_name, prompt_tokens=len(prompt.input_ids))
    assembler = TextAssembler(state.tokenizer, req.stops())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            stream_events(job, assembler, completion, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text, reason, count = await collect(job, assembler)
    return completion.reply(text, reason, count)


def _submit(state: ServerState, req: ChatRequest, prompt) -> Job:
    """Queue the request's job for the batcher; a full queue or a stopped worker is a 503."""
    max_tokens = requested_max_tokens(req, state.settings)
    gen = generation_config(req, max_tokens, state.settings)
    job = Job(prompt=prompt, gen=gen, max_new_tokens=max_tokens, loop=asyncio.get_running_loop())
    try:
        state.batcher.submit(job)
    except QueueFull as e:
        raise APIError(503, f"server busy: {e}; retry later", code="overloaded", kind="server_error") from None
    except RuntimeError as e:
        raise APIError(503, str(e), code="unavailable", kind="server_error") from None
    return job
