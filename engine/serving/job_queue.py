"""One thread owns the loaded model and runs generation jobs one at a time, in order.

Generation is CPU-bound PyTorch, and a ``ResponseGenerator`` keeps per-call state
(its notices, ``last_stats``, the KV cache), so two requests must never use it at
once. The server's event loop, meanwhile, must stay free to read new requests and
answer ``/health``. So a single worker thread loads the model, then takes jobs from
a queue in the order they arrived. A job hands each text piece back to the event
loop as soon as it is made (``Job.events``). A job whose client has gone away is
cancelled: skipped if it has not started, stopped between two pieces if it has.

This module knows nothing of HTTP: the server builds a job from a request, and a
job is only a function from the loaded generator to an iterator of text pieces.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


class WorkerState(str, Enum):
    """Where the worker is: loading the model, answering jobs, or stopped by a load failure.

    A ``str`` so that ``/health`` sends the value as it is ("loading", "ready", "failed").
    """

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class FinishReason(str, Enum):
    """Why a job's text ended; the values are the OpenAI API's ``finish_reason``.

    STOP and LENGTH are the generator's own (``GenerationStats.finish_reason``, a plain
    string in ``engine.generation``); CANCELLED is the worker's: the client left.
    """

    STOP = "stop"  # end of text, end of turn, or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Started:
    """The prompt is built and generation begins; ``notices`` say what was adjusted."""

    notices: list[str]


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class Failed:
    """The job could not run: ``user_error`` for a ValueError the request caused."""

    message: str
    user_error: bool


Event = Started | Piece | Finished | Failed


class QueueFull(Exception):
    """More jobs are waiting than the worker accepts."""


class Job:
    """One request's generation: ``start(generator)`` returns its iterator of text pieces.

    Events arrive on ``events`` (an asyncio queue of the loop that created the job) in
    the order Started, Piece..., Finished; or a single Failed.
    """

    def __init__(self, start: Callable[[Any], Iterator[str]]) -> None:
        self.start = start
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop this job: the client has gone. Harmless once the job has finished."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Hand an event to the event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancel()


@dataclass
class WorkerCounts:
    """What the worker has done since it started (for /health and the load run)."""

    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GenerationWorker:
    """The thread that loads the model with ``load()`` and then runs jobs one at a time.

    ``state`` is LOADING, then READY, or FAILED (``error`` says why).
    ``on_loaded(error)`` is called once from the worker thread, with None on success.
    """

    def __init__(self, load: Callable[[], Any], max_waiting: int,
                 on_loaded: Callable[[str | None], None] | None = None) -> None:
        self._load = load
        self._on_loaded = on_loaded
        self.max_waiting = max_waiting
        self.state = WorkerState.LOADING
        self.error: str | None = None
        self.counts = WorkerCounts()
        self.busy = False
        self._jobs: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            if len(self._jobs) >= self.max_waiting:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting")
            self._jobs.append(job)
            self._wakeup.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what is waiting and running, and let the thread end."""
        with self._wakeup:
            self._closing = True
            for job in self._jobs:
                job.cancel()
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        began = time.perf_counter()
        try:
            generator = self._load()
        except Exception as exc:  # any failure must end in FAILED, never a silent dead thread
            log.debug("loading the model failed", exc_info=True)
            self.state, self.error = WorkerState.FAILED, str(exc) or type(exc).__name__
            if self._on_loaded:
                self._on_loaded(self.error)
            return
        log.info("model loaded in %.2f s", time.perf_counter() - began)
        self.state = WorkerState.READY
        if self._on_loaded:
            self._on_loaded(None)
        while True:
            with self._wakeup:
                while not self._jobs and not self._closing:
                    self._wakeup.wait()
                if self._closing:
                    return
                job = self._jobs.popleft()
                self.busy = True
            try:
                self._serve(job, generator)
            finally:
                self.busy = False

    def _serve(self, job: Job, generator: Any) -> None:
        if job.cancelled:  # the client left while the job waited
            self.counts.cancelled += 1
            job.emit(Finished(0, 0, FinishReason.CANCELLED))
            return
        pieces = None
        stopped = False
        try:
            pieces = job.start(generator)
            job.emit(Started(list(generator.notices)))
            for piece in pieces:
                if job.cancelled or self._closing:
                    stopped = True
                    break
                job.emit(Piece(piece))
        except ValueError as exc:  # the request asked for something impossible
            self.counts.failed += 1
            job.emit(Failed(str(exc), user_error=True))
            return
        except Exception:  # a bug: its traceback goes to the log, never to the client
            log.exception("generation failed")
            self.counts.failed += 1
            job.emit(Failed("generation failed on the server; see its log", user_error=False))
            return
        finally:
            if pieces is not None and hasattr(pieces, "close"):
                pieces.close()  # ends the generator, which records last_stats
        stats = generator.last_stats
        reason = FinishReason.CANCELLED if stopped else FinishReason(stats.finish_reason)
        self.counts.cancelled += stopped
        self.counts.finished += not stopped
        self.counts.prompt_tokens += stats.prompt_tokens
        self.counts.completion_tokens += stats.completion_tokens
        log.info("%d prompt + %d completion tokens, %s", stats.prompt_tokens, stats.completion_tokens, reason.value)
        job.emit(Finished(stats.prompt_tokens, stats.completion_tokens, reason))
