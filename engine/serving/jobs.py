"""What travels between the server's endpoints and the generation worker: jobs and their events.

A ``Job`` is made on the event loop from a request and carries the function that
builds its prompt; the worker thread answers with events, handed back to the loop
(``Job.emit``): ``Started`` (the prompt is built), ``Piece`` (text), ``Finished``, or
``Failed``. ``WorkerCounts`` is what the worker has done, for ``/health``.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Callable

from engine.generation.prompts import PreparedRequest, PromptBuilder
from engine.generation.token_loop import FinishReason


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

TEXT_INTERVAL_S = 0.02  # a lone stream's text: 50 updates a second, smooth to read
TEXT_INTERVAL_PER_STREAM_S = 0.005
MAX_TEXT_INTERVAL_S = 0.1


def text_interval(answering: int) -> float:
    """Seconds between two handovers of a stream's text while ``answering`` requests are
    being answered: 20 ms up to 4 streams, then 5 ms a stream, at most 100 ms.

    The event loop's work grows with the pieces it writes a second in all, and every
    piece holds the interpreter the generation thread needs. On the 2-core Xeon, against
    a fixed 20 ms (two alternating runs of each): 16 streams made 2,892-3,040 tokens/s
    in all against 2,545-2,743 on the bench's gpt2, 1,892-2,061 against 1,688-1,742 on
    the first session's llama; 8 streams 5% more; the first token came no later. And
    12 updates a second still read as a smooth stream.
    """
    return min(MAX_TEXT_INTERVAL_S, max(TEXT_INTERVAL_S, answering * TEXT_INTERVAL_PER_STREAM_S))


class Job:
    """One request's generation: ``start(prompts)`` describes it.

    ``prompts`` is the loaded model's ``PromptBuilder``; ``start`` calls its ``complete``
    or ``chat`` and returns the ``PreparedRequest`` (a ValueError there is the request's
    fault: a 400). The worker runs it among the others and sends its events to
    ``events`` (an asyncio queue of the loop that created the job) in the order Started,
    Piece..., Finished; or a single Failed.

    Text is handed over at most every ``text_interval(answering())`` seconds (the first
    at once), and all the text made meanwhile goes as one Piece. Each Piece costs the
    event loop a JSON chunk and an HTTP write, and the loop shares the interpreter with
    the worker: one Piece per token made a lone stream on the server a third slower than
    in the menu. ``answering`` says how many requests the worker is answering (the
    worker sets it). Every other event goes at once, after the text before it.
    """

    def __init__(self, start: Callable[[PromptBuilder], PreparedRequest]) -> None:
        self.start = start
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()
        self._outbox_lock = threading.Lock()
        self._outbox: list[Event] = []  # made by the worker, not yet taken by the loop, in order
        self._drain_due = False  # whether a drain is on its way (soon, or after the interval)
        self._urgent_due = False  # whether an immediate one is
        self._text_handed_at = float("-inf")  # loop time of the last handover of text
        self.answering: Callable[[], int] = lambda: 1

    def cancel(self) -> None:
        """Stop this job: the client has gone. Harmless once the job has finished."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Hand an event to the event loop (called from the worker thread)."""
        urgent = not isinstance(event, Piece)
        with self._outbox_lock:
            if not urgent and self._outbox and isinstance(self._outbox[-1], Piece):
                self._outbox[-1] = Piece(self._outbox[-1].text + event.text)
            else:
                self._outbox.append(event)
            if self._urgent_due or (self._drain_due and not urgent):  # the drain on its way takes it
                return
            self._drain_due, self._urgent_due = True, urgent
        try:
            self._loop.call_soon_threadsafe(self._schedule, urgent)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancel()

    def _schedule(self, urgent: bool) -> None:
        """On the loop: drain now, or once the interval since the last text has passed."""
        wait = 0.0 if urgent else self._text_handed_at + text_interval(self.answering()) - self._loop.time()
        if wait > 0:
            self._loop.call_later(wait, self._drain)
        else:
            self._drain()

    def _drain(self) -> None:
        """On the loop: everything the worker has emitted so far, into ``events``."""
        with self._outbox_lock:
            taken, self._outbox = self._outbox, []
            self._drain_due = self._urgent_due = False
        if any(isinstance(event, Piece) for event in taken):
            self._text_handed_at = self._loop.time()
        for event in taken:
            self.events.put_nowait(event)


@dataclass
class WorkerCounts:
    """What the worker has done since it started (for /health and the load run)."""

    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
