"""Continuous batching: the requests being answered share one Decoder pass per step.

``BatchScheduler`` holds up to ``max_batch`` requests at once, each a ``Reply``
(``engine.generation.token_loop``) with its own KV cache, sampling settings, seed,
stop strings and prompt, built by the same ``PromptBuilder`` as the menu's. A step
gathers what every reply feeds (one id for a reply that is generating, a chunk of its
prompt for one that is starting), runs them through ``Decoder.step_many`` together,
hands each reply its own row of logits and sends each job the text its reply made. A
new request joins at the next step; a finished one leaves at once; a cancelled one
(its client left) leaves before the next step, and nobody else notices.

Prefill is bounded, so that a long prompt never stalls the replies already streaming:
a prompt is fed in chunks of at most ``PREFILL_CHUNK`` ids, and one step carries at
most ``prefill_budget`` prompt ids in all, always at least one chunk so that every
prompt advances. A prompt of n ids thus takes about n / prefill_budget steps, and each
of those steps also gives every streaming reply its next token: a stream waits for at
most one chunk's compute per token, never for a whole prompt. The same holds for the
re-fill after a context is cropped.

A request with a fixed seed gets the same tokens alone as among any others: its
chunks are cut from its own prompt alone, its draws come from its own generator, and
its rows' logits do not depend on the other rows of the step where
``Decoder.step_many`` is batch-invariant (decoder.py says exactly where: on the CPU
with fp16 weights, the default; not with fp32 weights or on GPUs, where a token can
differ in the rare case that a draw falls within rounding of a boundary).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.generation.generator import ResponseGenerator
from engine.generation.token_loop import PREFILL_CHUNK, FinishReason, Reply, take_all
from engine.model.decoder import KVCache
from engine.serving.jobs import Failed, Finished, Job, Piece, Started, WorkerCounts
from engine.serving.step_threads import StepThreads

log = logging.getLogger(__name__)

MAX_BATCH = 32  # requests answered at once; the rest wait in the worker's queue


@dataclass
class Active:
    """A request being answered: its job (where its events go) and its reply."""

    job: Job
    reply: Reply


class BatchScheduler:
    """The requests being answered on the loaded model, and one step of all of them at a time.

    Runs on the generation worker's thread only. ``counts`` is the worker's: the
    scheduler adds every request that finishes, is cancelled or fails. ``threads``
    (the server's) sets PyTorch's threads before each step; None leaves them alone.
    """

    def __init__(self, generator: ResponseGenerator, counts: WorkerCounts, max_batch: int = MAX_BATCH,
                 prefill_budget: int = PREFILL_CHUNK, prefill_chunk: int = PREFILL_CHUNK,
                 threads: StepThreads | None = None) -> None:
        self.decoder = generator.decoder()
        self.prompts = generator.prompts
        self.tokenizer = generator.tokenizer
        self.context = generator.context
        self.counts = counts
        self.max_batch = max_batch
        self.prefill_budget = prefill_budget
        self.prefill_chunk = prefill_chunk  # the menu's too by default, so both cut a prompt alike
        self.threads = threads
        self.active: list[Active] = []
        self._spare: list[KVCache] = []  # caches of replies that have left, for the next to join

    @property
    def room(self) -> int:
        """How many more requests may join now."""
        return self.max_batch - len(self.active)

    def admit(self, job: Job) -> None:
        """Build the job's prompt and let it join at the next step (or answer why it cannot)."""
        if job.cancelled:  # the client left while the job waited
            self.counts.cancelled += 1
            job.emit(Finished(0, 0, FinishReason.CANCELLED))
            return
        try:
            request = job.start(self.prompts)
        except ValueError as exc:  # the request asked for something impossible
            self._fail(job, str(exc), user_error=True)
            return
        except Exception:  # a bug: its traceback goes to the log, never to the client
            log.exception("building a prompt failed")
            self._fail(job, "generation failed on the server; see its log", user_error=False)
            return
        cache = self._spare.pop() if self._spare else self.decoder.new_cache()
        cache.reset()
        self.active.append(Active(job, Reply(request, self.tokenizer, self.context, cache, self.prefill_chunk)))
        job.emit(Started(list(request.notices)))

    def step(self) -> None:
        """One Decoder pass for the replies this step carries; their text to their jobs."""
        for active in [a for a in self.active if a.job.cancelled]:
            self._leave(active, FinishReason.CANCELLED)
        carried = self._carried()
        if not carried:
            return
        try:
            feeds = [a.reply.feed() for a in carried]
            rows = sum(len(feed.ids) for feed in feeds)
            threads = self._set_threads(rows)
            began = time.perf_counter()
            logits = self.decoder.step_many(feeds)
            texts = take_all([a.reply for a in carried], logits)
            if self.threads is not None:
                self.threads.record(threads, rows, time.perf_counter() - began)
            for active, text in zip(carried, texts):
                if text:
                    active.job.emit(Piece(text))
        except Exception:  # a bug in the step: every reply in it is lost, the worker carries on
            log.exception("a generation step failed")
            for active in list(self.active):
                self.active.remove(active)
                self._fail(active.job, "generation failed on the server; see its log", user_error=False)
            return
        for active in carried:
            if active.reply.done:
                self._leave(active, FinishReason(active.reply.finish_reason))

    def close(self) -> None:
        """Cancel every reply still running (the server is stopping)."""
        for active in list(self.active):
            self._leave(active, FinishReason.CANCELLED)

    def _set_threads(self, rows: int) -> int:
        """PyTorch's threads for a step of ``rows`` rows, as ``self.threads`` chooses."""
        if self.threads is None:
            return torch.get_num_threads()
        threads = self.threads.threads(rows)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # a fraction of a microsecond: per step is cheap enough
        return threads

    def _carried(self) -> list[Active]:
        """Every reply that is generating, and, in the order they came, those feeding a
        prompt while this step's prefill budget lasts (the first of them always)."""
        carried, prompt_ids = [], 0
        for active in self.active:
            if active.reply.prefilling:
                n = min(len(active.reply.loop.pending), active.reply.loop.chunk)
                if prompt_ids and prompt_ids + n > self.prefill_budget:
                    continue
                prompt_ids += n
            carried.append(active)
        return carried

    def _leave(self, active: Active, reason: FinishReason) -> None:
        """The reply is over (finished, or cancelled): count it, tell its job, free its cache."""
        self.active.remove(active)
        self._spare.append(active.reply.loop.cache)
        stats = active.reply.stats
        if reason is FinishReason.CANCELLED:
            self.counts.cancelled += 1
        else:
            self.counts.finished += 1
        self.counts.prompt_tokens += stats.prompt_tokens
        self.counts.completion_tokens += stats.completion_tokens
        log.info("%d prompt + %d completion tokens, %s", stats.prompt_tokens, stats.completion_tokens, reason.value)
        active.job.emit(Finished(stats.prompt_tokens, stats.completion_tokens, reason))

    def _fail(self, job: Job, message: str, user_error: bool) -> None:
        self.counts.failed += 1
        job.emit(Failed(message, user_error))
