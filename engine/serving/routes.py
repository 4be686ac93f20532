"""The API's endpoints: a request in, a generation job on the worker, the answer out.

``Routes`` holds what every endpoint needs (the worker, the model's name, the
generation defaults, the ``max_tokens`` cap) and adds its handlers to an app:
``GET /`` (the chat page, ``engine.serving.chat_page``), ``GET /health``, ``GET /v1/models[/{model}]``, ``POST /v1/completions`` and
``POST /v1/chat/completions``. A generation request becomes a ``Job``; the answer is
either one JSON body, built once the job finishes, or a stream of server-sent events
sent as the pieces arrive (``JobStream``). Either way, a client that hangs up cancels
its job at once (``ClientWatch`` before the answer starts, the stream after).
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.data.chat_format import Message
from engine.generation.prompts import PreparedRequest, PromptBuilder
from engine.generation.sampling import GenerationConfig
from engine.serving.api_guard import ApiError
from engine.serving.chat_page import PAGE_PATH, ChatPage
from engine.serving.job_queue import (
    Event,
    Failed,
    Finished,
    GenerationWorker,
    Job,
    Piece,
    QueueFull,
    Started,
    WorkerState,
)
from engine.serving.openai_wire import ChatRequest, CompletionRequest, GenerationFields, ResponseShape, error_body, sse

NOTICE_HEADER = "X-Notice"  # what the generator adjusted (a prompt cut to fit, ...), "; "-joined
CLIENT_CLOSED = 499  # the status logged for a request whose client left before its answer (nginx's code)


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


# -- a job's client ------------------------------------------------------------------------------

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


async def stream_events(job: Job, shape: ResponseShape, notices: list[str], usage: bool) -> AsyncIterator[str]:
    """The job's pieces as server-sent events after ``Started``: chunks, the finish, [DONE]."""
    first = shape.chunk(first=True) if shape.chat else None
    if first is not None:
        yield sse({**first, "notices": notices} if notices else first)
    while True:
        event = await job.events.get()
        if isinstance(event, Piece):
            yield sse(shape.chunk(event.text))
        elif isinstance(event, Finished):
            yield sse(shape.chunk(finish_reason=event.finish_reason.value))
            if usage:
                yield sse(shape.usage_chunk(event.prompt_tokens, event.completion_tokens))
            break
        elif isinstance(event, Failed):
            yield sse(error_body(event.message, "server_error", code="internal_error"))
            break
    yield sse("[DONE]")


async def whole_answer(watch: ClientWatch, shape: ResponseShape, first: Started,
                       headers: dict[str, str]) -> Response:
    """Gathers the job's pieces after ``Started`` into one JSON body, sent once it finishes."""
    pieces = []
    while True:
        event = await watch.next_event()
        if event is None:
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(event, Piece):
            pieces.append(event.text)
        elif isinstance(event, Finished):
            return JSONResponse(shape.whole("".join(pieces), event.finish_reason.value, event.prompt_tokens,
                                            event.completion_tokens, first.notices), headers=headers)
        elif isinstance(event, Failed):
            raise ApiError(500, event.message, code="internal_error")


# -- the endpoints -------------------------------------------------------------------------------

class Routes:
    """The endpoints of one served model; ``add_to(app)`` registers them."""

    def __init__(self, worker: GenerationWorker, model_id: str, gen_defaults: GenerationConfig,
                 max_tokens_cap: int, created: int = 0) -> None:
        self.worker = worker
        self.model_id = model_id
        self.gen_defaults = gen_defaults
        self.max_tokens_cap = max_tokens_cap
        self.created = created  # the weights' modification time, the model card's "created"
        self.page = ChatPage.load()

    def add_to(self, app: FastAPI) -> None:
        app.get(PAGE_PATH)(self.chat_page)
        app.get("/health")(self.health)
        app.get("/v1/models")(self.list_models)
        app.get("/v1/models/{model}")(self.get_model)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)

    def check_ready(self, requested_model: str | None = None) -> None:
        """Refuses a request while the model loads, after it failed to, or for another model."""
        if self.worker.state is WorkerState.LOADING:
            raise ApiError(503, "the model is still loading; try again in a moment", code="model_loading",
                           headers={"Retry-After": "1"})
        if self.worker.state is WorkerState.FAILED:
            raise ApiError(503, f"the model could not be loaded: {self.worker.error}", code="model_unavailable")
        if requested_model is not None and requested_model != self.model_id:
            raise ApiError(404, f"the model {requested_model!r} does not exist here; "
                                f"this server has {self.model_id!r}", param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "custom-llm"}

    async def chat_page(self) -> Response:
        return self.page.response()

    async def health(self) -> JSONResponse:
        worker, counts = self.worker, self.worker.counts
        ready = worker.state is WorkerState.READY
        body = {"status": "ok" if ready else worker.state.value, "model": self.model_id,
                "waiting": worker.waiting, "busy": worker.busy, "answering": worker.answering,
                "finished": counts.finished, "cancelled": counts.cancelled, "failed": counts.failed,
                "prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens}
        if worker.threads is not None:  # what big steps run on now: all cores, or one when another program holds one
            body["threads"] = {"small_steps": worker.threads.few, "big_steps": worker.threads.chosen}
        return JSONResponse(body, 200 if ready else 503)

    async def list_models(self) -> dict:
        self.check_ready()
        return {"object": "list", "data": [self.model_card()]}

    async def get_model(self, model: str) -> dict:
        self.check_ready(model)
        return self.model_card()

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_ready(body.model)
        cfg = generation_config(body, self.gen_defaults, self.max_tokens_cap)
        prompt, stops = body.prompt, body.stop
        return await self.respond(request, body, ResponseShape(chat=False, model=self.model_id),
                                  lambda prompts: prompts.complete(prompt, cfg, stops))

    async def chat_completions(self, body: ChatRequest, request: Request) -> Response:
        self.check_ready(body.model)
        cfg = generation_config(body, self.gen_defaults, self.max_tokens_cap)
        messages, stops = chat_messages(body), body.stop
        return await self.respond(request, body, ResponseShape(chat=True, model=self.model_id),
                                  lambda prompts: prompts.chat(messages, cfg, stops))

    async def respond(self, request: Request, body: GenerationFields, shape: ResponseShape,
                      start: Callable[[PromptBuilder], PreparedRequest]) -> Response:
        """Queues the generation ``start`` describes (see ``Job``) and answers with its text."""
        job = Job(start)
        try:
            self.worker.submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy ({exc}); try again later", code="server_busy",
                           headers={"Retry-After": "5"}) from None
        watch = ClientWatch(job, request.receive)
        try:
            return await self.answer(job, watch, body, shape)
        finally:
            watch.close()

    async def answer(self, job: Job, watch: ClientWatch, body: GenerationFields, shape: ResponseShape) -> Response:
        """The job's first event decides the status; then one JSON body, or a stream if asked."""
        first = await watch.next_event()
        if first is None:
            return Response(status_code=CLIENT_CLOSED)  # nobody is listening
        if isinstance(first, Failed):
            raise ApiError(400 if first.user_error else 500, first.message,
                           param="messages" if shape.chat and first.user_error else None)
        assert isinstance(first, Started)
        headers = {NOTICE_HEADER: "; ".join(first.notices)} if first.notices else {}
        if not body.stream:
            return await whole_answer(watch, shape, first, headers)
        watch.close()  # the streamed response notices the client leave by itself
        usage = body.stream_options is not None and body.stream_options.include_usage
        return JobStream(job, stream_events(job, shape, first.notices, usage), headers)
