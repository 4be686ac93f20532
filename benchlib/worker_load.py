"""The server's generation worker under the server's load, in this process: no HTTP.

The server levels (``server_load``) measure everything a client sees: the batching
engine, and the HTTP, JSON and event-loop work around it, all in one interpreter. To
tell the two apart, each level also runs here through the server's own worker
(``GenerationWorker`` with the same ``StepThreads`` and frozen loaded objects),
with the same requests, kinds, seeds and number of clients taking the next request
as soon as their last is answered, and nothing else: no sockets, no JSON. The gap
between the two is what serving over HTTP costs at that level; the gain over one
stream here is as far as batching alone takes this model on this machine.
"""
from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.data.chat_format import Message
from engine.runtime import hardware
from engine.serving.job_queue import Failed, Finished, GenerationWorker, Job
from engine.serving.step_threads import StepThreads
from response_generator import GenerationConfig, ResponseGenerator


@dataclass(frozen=True)
class WorkerLevel:
    """One level through the worker: ``clients`` at once, the completion tokens they got, and how fast."""

    clients: int
    completion_tokens: int
    tokens_per_s: float


def request_kind(index: int, prompts: list[str]) -> tuple[bool, str]:
    """Request ``index``'s kind and prompt: (whether it is a chat, the prompt or user message)."""
    return index % 4 < 2, prompts[index % len(prompts)]


def worker_levels(model_dir: Path, levels: list[int], requests: int, max_tokens: int,
                  prompts: list[str]) -> list[WorkerLevel]:
    """Each level of ``levels`` clients through the server's worker, ``requests`` requests
    a level (request i as ``request_kind(i, prompts)``, seed i, up to ``max_tokens``)."""
    many = torch.get_num_threads()
    few = hardware.configure_cpu_threads_for_serving()
    try:
        return asyncio.run(_levels(model_dir, levels, requests, max_tokens, prompts, StepThreads(few, many)))
    finally:
        gc.unfreeze()  # the worker froze this process's objects, as the server does its own
        torch.set_num_threads(many)


async def _levels(model_dir: Path, levels: list[int], requests: int, max_tokens: int, prompts: list[str],
                  threads: StepThreads) -> list[WorkerLevel]:
    loop = asyncio.get_running_loop()
    loaded: asyncio.Future[str | None] = loop.create_future()
    worker = GenerationWorker(lambda: ResponseGenerator(str(model_dir)), requests,
                              lambda error: loop.call_soon_threadsafe(loaded.set_result, error),
                              threads=threads, freeze_loaded=True)
    worker.start()
    try:
        error = await loaded
        if error is not None:
            raise RuntimeError(f"the worker could not load {model_dir}: {error}")
        await _answer(worker, 0, max_tokens, prompts)  # warms up, as the server level's first request
        return [await _level(worker, n, requests, max_tokens, prompts) for n in levels]
    finally:
        worker.close()


async def _level(worker: GenerationWorker, clients: int, requests: int, max_tokens: int,
                 prompts: list[str]) -> WorkerLevel:
    waiting = list(range(requests))[::-1]  # popped from the end: request 0 first
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while waiting:
            made = await _answer(worker, waiting.pop(), max_tokens, prompts)
            tokens += made  # after the await: ``tokens += await ...`` would read it before

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return WorkerLevel(clients, tokens, tokens / (time.perf_counter() - began))


async def _answer(worker: GenerationWorker, index: int, max_tokens: int, prompts: list[str]) -> int:
    """Request ``index`` through the worker, as the server's endpoints make it: its completion tokens."""
    chat, prompt = request_kind(index, prompts)
    cfg = GenerationConfig(max_new_tokens=max_tokens, seed=index)
    job = Job((lambda builder: builder.chat([Message("user", prompt)], cfg)) if chat
              else (lambda builder: builder.complete(prompt, cfg)))
    worker.submit(job)
    while True:
        event = await job.events.get()
        if isinstance(event, Finished):
            return event.completion_tokens
        if isinstance(event, Failed):
            raise RuntimeError(f"request {index} failed in the worker: {event.message}")
