"""An OpenAI-compatible chat server for a vlmkit model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions (text and `image_url` parts, SSE streaming), GET
/v1/models, GET /health, and a small web page at /.

Every request is checked before it reaches the model, and every way it can be wrong answers
with a 4xx and an OpenAI-style error body: the body is read with a byte cap (a client cannot
make the server buffer gigabytes), JSON and fields are validated, images must be `data:` URIs
unless remote fetching was switched on, and decoded images go through the same pixel and
aspect-ratio guards as training data, in worker threads (never on the event loop). Only then
is a job queued for the batcher.

The pieces: `state` (settings and the shared batcher and threads), `routes` (the endpoints and
the Host/Origin/API-key checks), `parsing` (from request bytes to an encoded prompt),
`streaming` (tokens to text and SSE chunks), `batching` (the generation worker) and `errors`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from vlmkit.serve.errors import add_error_handlers
from vlmkit.serve.routes import router
from vlmkit.serve.state import ServerSettings, ServerState
from vlmkit.serve.streaming import TextAssembler

__all__ = ["ServerSettings", "TextAssembler", "create_app", "run_server"]


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    state.start()
    try:
        yield
    finally:
        state.stop()


def create_app(model, processor, settings: ServerSettings | None = None) -> FastAPI:
    """The server app for `model` and its chat `processor`; uvicorn (see `run_server`) serves it."""
    state = ServerState.build(model, processor, settings or ServerSettings())
    app = FastAPI(title="vlmkit", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.batcher = state.batcher
    app.state.settings = state.settings
    add_error_handlers(app)
    app.include_router(router)
    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", sock=None) -> None:
    """`sock`: a socket the caller already bound (uvicorn then serves on it instead of binding)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
