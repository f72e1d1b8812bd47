"""Errors a client gets: OpenAI-style error bodies, and the handlers that send them."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vlmkit.serve")
# Pillow and the tokenizers sometimes put object reprs in messages; a client gains nothing from them.
OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def clip(text: str, limit: int = 100) -> str:
    """A client's value as an error message may quote it: its first `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif exc.status == 408:
        headers = {"Connection": "close"}  # the rest of the body may still come: no keep-alive
    return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not a bad request: the traceback goes to the log, the client gets no internals.
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error", code="internal_error"), status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
