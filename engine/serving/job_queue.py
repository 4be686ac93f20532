"""One thread owns the loaded model and answers the server's requests, many at once.

Generation is CPU-bound PyTorch, and the server's event loop must stay free to read
new requests and answer ``/health``. So a single worker thread loads the model, then
takes jobs from a queue in the order they arrived and answers them together: every
request being answered advances by one token per step of one shared forward pass
(``engine.serving.batching``). A job hands each text piece back to the event loop as
soon as it is made (``Job.events``). A job whose client has gone away is cancelled:
skipped if it has not started, dropped between two steps if it has.

This module knows nothing of HTTP: the server builds a job from a request (``jobs``),
and a job is only a function from the model's prompt builder to a prepared request.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from enum import Enum
from typing import Any, Callable

from engine.generation.token_loop import FinishReason
from engine.runtime import hardware
from engine.serving.batching import MAX_BATCH, BatchScheduler
from engine.serving.jobs import Event, Failed, Finished, Job, Piece, Started, WorkerCounts
from engine.serving.step_threads import StepThreads

# The names the endpoints take from here; the jobs and their events live in ``jobs``.
__all__ = ["Event", "Failed", "Finished", "FinishReason", "GenerationWorker", "Job", "Piece", "QueueFull", "Started",
           "WorkerCounts", "WorkerState"]

log = logging.getLogger(__name__)


class WorkerState(str, Enum):
    """Where the worker is: loading the model, answering jobs, or stopped by a load failure.

    A ``str`` so that ``/health`` sends the value as it is ("loading", "ready", "failed").
    """

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class QueueFull(Exception):
    """More jobs are waiting than the worker accepts."""


class GenerationWorker:
    """The thread that loads the model with ``load()`` and then answers jobs, up to
    ``max_batch`` at once; up to ``max_waiting`` more wait their turn (``submit`` refuses
    the next with ``QueueFull``).

    ``load`` returns a ``ResponseGenerator``. ``state`` is LOADING, then READY, or
    FAILED (``error`` says why). ``on_loaded(error)`` is called once from the worker
    thread, with None on success. ``threads``: how many threads each step uses
    (``BatchScheduler``; None keeps PyTorch's setting). ``freeze_loaded``: once the
    model is loaded, hide every object made so far from the garbage collector, for a
    process that keeps its model until it ends (the server's; see ``_loaded``).
    """

    def __init__(self, load: Callable[[], Any], max_waiting: int,
                 on_loaded: Callable[[str | None], None] | None = None, max_batch: int = MAX_BATCH,
                 threads: StepThreads | None = None, freeze_loaded: bool = False) -> None:
        self._load = load
        self.threads = threads
        self.freeze_loaded = freeze_loaded
        self._on_loaded = on_loaded
        self.max_waiting = max_waiting
        self.max_batch = max_batch
        self.state = WorkerState.LOADING
        self.error: str | None = None
        self.counts = WorkerCounts()
        self._scheduler: BatchScheduler | None = None
        self._jobs: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    @property
    def waiting(self) -> int:
        """Jobs not yet answered (queued behind a full batch, or until the next step)."""
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        """Whether any request is being answered."""
        return self.answering > 0

    def start(self) -> None:
        """Start the thread; the caller's thread (the event loop's) hands it all tensor work."""
        # Helpers left from the caller's own parallel work (a menu that trained or
        # generated before it served) would make every parallel operation of the
        # worker wake its helpers from sleep: see ``release_cpu_threads_of_this_thread``.
        hardware.release_cpu_threads_of_this_thread()
        self._thread.start()

    @property
    def answering(self) -> int:
        """How many requests are being answered now (read from any thread: a list's length)."""
        scheduler = self._scheduler
        return len(scheduler.active) if scheduler is not None else 0

    def submit(self, job: Job) -> None:
        job.answering = lambda: self.answering  # paces the job's text (jobs.text_interval)
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
        scheduler = self._loaded()
        if scheduler is None:
            return
        while True:
            with self._wakeup:
                while not self._jobs and not scheduler.active and not self._closing:
                    self._wakeup.wait()
                if self._closing:
                    break
                joining = [self._jobs.popleft() for _ in range(min(len(self._jobs), scheduler.room))]
            for job in joining:
                scheduler.admit(job)
            scheduler.step()
        scheduler.close()

    def _loaded(self) -> BatchScheduler | None:
        """Load the model and make its scheduler; on failure, FAILED (and None)."""
        began = time.perf_counter()
        try:
            scheduler = BatchScheduler(self._load(), self.counts, self.max_batch, threads=self.threads)
        except Exception as exc:  # any failure must end in FAILED, never a silent dead thread
            log.debug("loading the model failed", exc_info=True)
            self.state, self.error = WorkerState.FAILED, str(exc) or type(exc).__name__
            if self._on_loaded:
                self._on_loaded(self.error)
            return None
        log.info("model loaded in %.2f s", time.perf_counter() - began)
        if self.freeze_loaded:
            # The model, its tokenizer's tables and the modules loaded so far live as long
            # as the process: ~200,000 objects for the bench's model, and every full pass
            # of the cyclic garbage collector walked all of them, 76 ms in which no stream
            # got a token. Frozen, the collector never looks at them again; what requests
            # make afterwards is collected as before. On the 2-core Xeon, 3 alternating runs:
            # 16 streams made 3,101-3,304 tokens/s in all against 2,653-2,898 (bench's gpt2).
            gc.collect()
            gc.freeze()
        self._scheduler = scheduler
        self.state = WorkerState.READY
        if self._on_loaded:
            self._on_loaded(None)
        return scheduler
