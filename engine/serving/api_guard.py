"""What every request passes before the server reads it, and how a refusal is sent.

``Gate`` is ASGI middleware in front of the app: it checks the size of the headers and
the API key, then reads the body up to the size limit. Two requests pass without the key: ``/health`` (a
load balancer's probe) and ``GET /``, the chat page, which holds no secret and asks
for the key when its first API call is refused. ``ApiError`` is any refusal, sent in
the OpenAI error shape with its HTTP status; a 4xx is the client's mistake, a 5xx
the server's.
``install_error_handlers`` makes every other failure (a body that does not validate,
an unknown path, a bug) leave in that same shape.
"""
from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from engine.serving.chat_page import PAGE_PATH
from engine.serving.openai_wire import describe_validation_errors, error_body

log = logging.getLogger(__name__)

# The headers of one request, names and values together. The HTTP layer (h11) refuses a
# header that arrives in pieces beyond 16 KiB, but takes one that arrives whole at any
# size; nginx's default limit is 32 KiB too.
MAX_HEADER_BYTES = 32 * 1024


class ApiError(Exception):
    """A request the server refuses: sent as the OpenAI error shape with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        type_ = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse(error_body(self.message, type_, self.param, self.code), self.status, headers=self.headers)


def needs_key(method: str, path: str) -> bool:
    """Whether a request must carry the API key (when the server has one): all but the two open ones."""
    return not (path == "/health" or (path == PAGE_PATH and method == "GET"))


class Gate:
    """ASGI middleware: checks the headers' size and the API key, then reads the body up to the size limit.

    The key is checked first, so a client without it cannot make the server read a
    large body. The size is checked twice: the declared Content-Length, and the
    bytes that really arrive (a chunked body declares none). The body is then
    replayed to the app, which never sees more than the limit.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app, self.api_key, self.max_body_bytes, self.body_timeout_s = app, api_key, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
                raise ApiError(431, f"the request's headers are larger than this server accepts "
                                    f"({MAX_HEADER_BYTES} bytes)", code="headers_too_large")
            if self.api_key and needs_key(scope["method"], scope["path"]):
                self._check_key(headers.get("authorization", ""))
            body = await self._read_body(headers.get("content-length"), receive)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        if scope["method"] == "POST":  # the API speaks only JSON: read it as JSON whatever the
            # Content-Type says (curl -d sends a form type, and the body is still JSON)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _check_key(self, authorization: str) -> None:
        scheme, _, given = authorization.partition(" ")
        if not authorization:
            raise ApiError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "the API key is wrong", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, declared: str | None, receive) -> bytes:
        limit = self.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than this server accepts ({limit} bytes; "
                                  "--max-body-bytes)", code="request_too_large")
        if declared is not None:
            if not declared.strip().isdigit():
                raise ApiError(400, "the Content-Length header is not a number")
            if int(declared) > limit:
                raise too_large
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                               code="request_timeout") from None
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# -- every failure in the OpenAI error shape -----------------------------------------------------

async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_errors(exc.errors())
    return ApiError(400, message, param).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (unreadable JSON, no such path, wrong method), told in our words."""
    messages = {400: "the body could not be read as JSON (it must be UTF-8, nested at most a few hundred levels)",
                404: f"there is no {request.url.path} on this server (try /v1/models)",
                405: f"{request.method} is not allowed on {request.url.path}"}
    message = messages.get(exc.status_code, str(exc.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, message, code=code, headers=exc.headers).response()


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A 500 that names no internals; the traceback goes to the server's log."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "the server failed on this request; see its log", code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure of ``app`` answers in the OpenAI error shape, never a traceback."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _bug)
