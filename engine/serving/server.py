"""An OpenAI-compatible HTTP server for one model folder.

    python interface.py serve --model-dir DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Like the menu, the server only parses its input, calls the same generator
(``ResponseGenerator.complete`` and ``.chat``) and formats the result, here as the
OpenAI API's JSON and server-sent events, so editors, chat front-ends and the
official ``openai`` client work with it unchanged. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /health``.

One model is in memory. Its generator runs on one worker thread
(``engine.serving.job_queue``), so requests are answered one at a time, in order, while the
event loop keeps reading new ones. Another door reuses this one through
``add_serve_arguments(parser)`` and ``run_serve(model_dir, args, gen_defaults)``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.data.chat_format import Message
from engine.folder.model_folder import ModelFolder
from engine.generation.generator import ResponseGenerator
from engine.generation.sampling import GenerationConfig
from engine.runtime import hardware
from engine.serving.api_guard import ApiError, Gate
from engine.serving.job_queue import Event, Failed, Finished, GenerationWorker, Job, Piece, QueueFull, Started
from engine.serving.listening import exposure_warning, open_socket, start_line
from engine.serving.openai_wire import (
    ChatRequest,
    CompletionRequest,
    GenerationFields,
    ResponseShape,
    describe_validation_errors,
    error_body,
    sse,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "CUSTOM_LLM_API_KEY"
NOTICE_HEADER = "X-Notice"


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_tokens_cap: int = 1024
    max_waiting: int = 64
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append("--port must be from 0 (any free port) to 65535")
        if self.max_body_bytes < 1024:
            problems.append("--max-body-bytes must be at least 1024")
        if not 1 <= self.max_tokens_cap <= 100_000:
            problems.append("--max-tokens-cap must be from 1 to 100000")
        if self.max_waiting < 1:
            problems.append("--max-waiting must be at least 1")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("--api-key is empty")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        return cls(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                   max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
                   max_waiting=args.max_waiting)


# -- requests to generation settings ----------------------------------------------------------

def generation_config(req: GenerationFields, defaults: GenerationConfig, cap: int) -> GenerationConfig:
    """The request's settings over the server's defaults; every problem is a 400 naming its field."""
    asked = {"max_tokens": req.max_tokens, "max_completion_tokens": req.max_completion_tokens}
    given = {name: value for name, value in asked.items() if value is not None}
    if len(set(given.values())) > 1:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one of them",
                       param="max_completion_tokens")
    param, max_tokens = next(iter(given.items()), ("max_tokens", min(defaults.max_new_tokens, cap)))
    if max_tokens < 1:
        raise ApiError(400, f"{param} must be at least 1 (got {max_tokens})", param=param)
    if max_tokens > cap:
        raise ApiError(400, f"{param} is {max_tokens}; this server allows at most {cap} (--max-tokens-cap)",
                       param=param)
    values = {"max_new_tokens": max_tokens}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        value = getattr(req, name)
        values[name] = getattr(defaults, name) if value is None else value
    try:
        return GenerationConfig(**values)
    except ValueError as exc:
        message = str(exc)
        raise ApiError(400, message, param=next((n for n in values if message.startswith(n)), None)) from None


def chat_messages(req: ChatRequest) -> list[Message]:
    """OpenAI's newer "developer" role is what our format calls the system message."""
    return [Message("system" if m.role == "developer" else m.role, m.content) for m in req.messages]


# -- the app ------------------------------------------------------------------------------------

class ClientWatch:
    """Cancels a job the moment its client disconnects, and wakes whoever waits for it.

    A task reads the request's ASGI channel: once the body has been read, the next
    message the server sends there is ``http.disconnect``, which arrives as the
    connection closes. So a client that leaves stops its generation at once, however
    fast tokens are being made, rather than at the next look of a timer. Close the
    watch before handing the request to a streamed response, which listens itself.
    """

    def __init__(self, job: Job, receive: Callable[[], Awaitable[dict]]) -> None:
        self.job = job
        self.gone = False
        self._task = asyncio.create_task(self._listen(receive))

    async def _listen(self, receive: Callable[[], Awaitable[dict]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.job.cancel()
        self.job.events.put_nowait(None)  # wakes next_event

    async def next_event(self) -> Event | None:
        """The job's next event; None once the client has gone (the job is then cancelled)."""
        event = None if self.gone else await self.job.events.get()
        return None if self.gone else event

    def close(self) -> None:
        self._task.cancel()


class JobStream(StreamingResponse):
    """A streamed response that cancels its job however it ends (finished, or the client left)."""

    def __init__(self, job: Job, content: AsyncIterator[str], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def create_app(worker: GenerationWorker, model_id: str, settings: ServeSettings,
               gen_defaults: GenerationConfig, created: int = 0) -> FastAPI:
    app = FastAPI(title="custom-llm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(exc.errors())
        return ApiError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {400: "the body could not be read as JSON (it must be UTF-8, nested at most a few hundred levels)",
                    404: f"there is no {request.url.path} on this server (try /v1/models)",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, message, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "the server failed on this request; see its log", code="internal_error").response()

    def check_ready(requested_model: str | None = None) -> None:
        if worker.state == "loading":
            raise ApiError(503, "the model is still loading; try again in a moment", code="model_loading",
                           headers={"Retry-After": "1"})
        if worker.state == "failed":
            raise ApiError(503, f"the model could not be loaded: {worker.error}", code="model_unavailable")
        if requested_model is not None and requested_model != model_id:
            raise ApiError(404, f"the model {requested_model!r} does not exist here; this server has {model_id!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "custom-llm"}

    @app.get("/health")
    async def health() -> JSONResponse:
        counts = worker.counts
        body = {"status": "ok" if worker.state == "ready" else worker.state, "model": model_id,
                "waiting": worker.waiting, "busy": worker.busy, "finished": counts.finished,
                "cancelled": counts.cancelled, "failed": counts.failed,
                "prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens}
        return JSONResponse(body, 200 if worker.state == "ready" else 503)

    @app.get("/v1/models")
    async def list_models() -> dict:
        check_ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict:
        check_ready(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_ready(body.model)
        cfg = generation_config(body, gen_defaults, settings.max_tokens_cap)
        prompt, stops = body.prompt, body.stop
        return await respond(request, body, ResponseShape(chat=False, model=model_id),
                             lambda gen: gen.complete(prompt, cfg, stops))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        check_ready(body.model)
        cfg = generation_config(body, gen_defaults, settings.max_tokens_cap)
        messages, stops = chat_messages(body), body.stop
        return await respond(request, body, ResponseShape(chat=True, model=model_id),
                             lambda gen: gen.chat(messages, cfg, stops))

    async def respond(request: Request, body: GenerationFields, shape: ResponseShape,
                      start: Callable[[Any], Iterator[str]]) -> Response:
        job = Job(start)
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy ({exc}); try again later", code="server_busy",
                           headers={"Retry-After": "5"}) from None
        watch = ClientWatch(job, request.receive)
        try:
            return await answer(job, watch, body, shape)
        finally:
            watch.close()

    async def answer(job: Job, watch: ClientWatch, body: GenerationFields, shape: ResponseShape) -> Response:
        first = await watch.next_event()
        if first is None:
            return Response(status_code=499)  # nobody is listening
        if isinstance(first, Failed):
            raise ApiError(400 if first.user_error else 500, first.message,
                           param="messages" if shape.chat and first.user_error else None)
        assert isinstance(first, Started)
        headers = {NOTICE_HEADER: "; ".join(first.notices)} if first.notices else {}
        if body.stream:
            watch.close()  # the streamed response notices the client leave by itself
            usage = body.stream_options is not None and body.stream_options.include_usage
            return JobStream(job, stream_events(job, shape, first.notices, usage), headers)
        pieces = []
        while True:
            event = await watch.next_event()
            if event is None:
                return Response(status_code=499)
            if isinstance(event, Piece):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                return JSONResponse(shape.whole("".join(pieces), event.finish_reason, event.prompt_tokens,
                                                event.completion_tokens, first.notices), headers=headers)
            elif isinstance(event, Failed):
                raise ApiError(500, event.message, code="internal_error")

    async def stream_events(job: Job, shape: ResponseShape, notices: list[str], usage: bool) -> AsyncIterator[str]:
        first = shape.chunk(first=True) if shape.chat else None
        if first is not None:
            yield sse({**first, "notices": notices} if notices else first)
        while True:
            event = await job.events.get()
            if isinstance(event, Piece):
                yield sse(shape.chunk(event.text))
            elif isinstance(event, Finished):
                yield sse(shape.chunk(finish_reason=event.finish_reason))
                if usage:
                    yield sse(shape.usage_chunk(event.prompt_tokens, event.completion_tokens))
                break
            elif isinstance(event, Failed):
                yield sse(error_body(event.message, "server_error", code="internal_error"))
                break
        yield sse("[DONE]")

    return app


# -- running it ---------------------------------------------------------------------------------

def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags, for any parser that starts it (server.py's own, interface.py serve)."""
    d = ServeSettings()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to listen on (default %(default)s: this machine only)")
    g.add_argument("--port", type=int, default=d.port, help="port (default %(default)s; 0 picks a free one)")
    g.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest request body accepted (default %(default)s)")
    g.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap,
                   help="largest max_tokens a request may ask for; more is a 400 (default %(default)s)")
    g.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="requests that may wait for their turn; more get a 503 (default %(default)s)")


def run_serve(model_dir: str | Path, settings: ServeSettings | argparse.Namespace,
              gen_defaults: GenerationConfig | None = None, runtime: hardware.Runtime | None = None,
              output_fn: Callable[[str], None] = print, verbose: bool = False) -> int:
    """Serve the model in ``model_dir`` until Ctrl+C (or SIGTERM). Returns the exit status.

    ``gen_defaults`` are the settings a request gets for the fields it leaves out.
    Prints one line with the URL (and a warning when other machines can reach it).
    """
    try:
        if not isinstance(settings, ServeSettings):
            settings = ServeSettings.from_args(settings)
        runtime = runtime or hardware.detect_runtime()
    except ValueError as exc:
        output_fn(f"Error: {exc}")
        return 2
    model_dir = Path(model_dir).expanduser()
    folder = ModelFolder(model_dir)
    if not folder.has_model():
        output_fn(f"Error: no trained model in {model_dir}; train one first (python interface.py)")
        return 2
    try:
        sock = open_socket(settings.host, settings.port)
    except OSError as exc:
        output_fn(f"Error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
        return 2
    model_id = model_dir.resolve().name
    log.info("generation uses %d thread(s)", hardware.configure_cpu_threads_for_serving())
    server: uvicorn.Server | None = None

    def on_loaded(error: str | None) -> None:
        if error is not None:
            output_fn(f"Error: cannot load the model: {error}")
            if server is not None:
                server.should_exit = True

    worker = GenerationWorker(lambda: ResponseGenerator(str(model_dir), runtime), settings.max_waiting, on_loaded)
    weights = model_dir / "model.pth"
    created = int(weights.stat().st_mtime) if weights.exists() else 0
    app = create_app(worker, model_id, settings, gen_defaults or GenerationConfig(), created)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                                           timeout_graceful_shutdown=5, lifespan="off"))
    output_fn(start_line(model_id, sock))
    warning = exposure_warning(settings.host, settings.api_key is not None)
    if warning:
        output_fn(warning)
    worker.start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops cleanly on Ctrl+C, then raises it again for its caller
        output_fn("Stopped.")
    finally:
        worker.close()
        sock.close()
    return 1 if worker.state == "failed" else 0
