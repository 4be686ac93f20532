"""The server under load: 1, 4, 8, 16 clients at once, on 127.0.0.1 only, a fixed number of requests.

``bench_server`` starts ``interface.py serve`` as a child process on a free port and,
at each level of concurrency, sends it the same number of streamed chat and completion
requests from that many client threads, each sending the next request as soon as its
last one is answered.
Per level: the aggregate completion tokens/s (continuous batching answers the streams
together, so this grows with the streams), the time to first token (p50, p95) and
the errors. The traffic is bounded and the server stops after.

Two yardsticks beside it, in this process. The same levels through the server's own
worker (``serving_worker``: its threads, its frozen loaded objects):
the same requests, seeds and clients, no sockets and no JSON. The gap between the two
is what serving over HTTP costs at that level; the gain over one stream there is as
far as batching alone takes this model on this machine. And the same requests one at
a time through the menu's generation.
"""
from __future__ import annotations

import asyncio
import gc
import http.client
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from benchlib.machine import OtherLoad, _cpu_ticks
from engine.data.chat_format import Message
from engine.data.sources import source_from_text
from engine.runtime import hardware
from engine.serving.job_queue import Failed, Finished, GenerationWorker, Job
from model import ModelConfig
from response_generator import GenerationConfig, ResponseGenerator

ROOT = Path(__file__).resolve().parents[1]  # the project folder, where interface.py is
SERVER_PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further,", "What is the king's name?",
                  "Speak, speak."]
SERVER_TRAIN_CHARS = 200_000  # the start of the corpus, for a model worth serving in seconds
LEVELS = (1, 4, 8, 16)  # concurrent streams


def server_model(corpus: Path, cfg: ModelConfig, batch: int, workdir: Path) -> Path:
    """A model folder to serve: the benchmark's model size, one epoch on the start of the corpus."""
    from trainer import Trainer

    folder = workdir / "server_model"
    text = corpus.read_text(encoding="utf-8", errors="replace")[:SERVER_TRAIN_CHARS]
    Trainer(str(folder), "bpe", model_overrides={"d_model": cfg.d_model, "n_layer": cfg.n_layer,
                                                 "n_head": cfg.n_head, "context": cfg.context, "arch": cfg.arch},
            train_overrides={"target_vocab_size": cfg.vocab_size, "batch_size": batch}).train(
        source_from_text(text), 1)
    return folder


def _request_kind(index: int) -> tuple[bool, str]:
    """Request ``index``'s kind and prompt: (whether it is a chat, the prompt or user message)."""
    return index % 4 < 2, SERVER_PROMPTS[index % len(SERVER_PROMPTS)]


def _server_request(host: str, port: int, index: int, max_tokens: int, stream: bool | None = None) -> dict:
    """One client's request (chat or completion, streamed or not, by ``index``): latency and tokens."""
    chat, prompt = _request_kind(index)
    stream = index % 2 == 1 if stream is None else stream
    body: dict = {"max_tokens": max_tokens, "seed": index, "stream": stream}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0, first, usage = time.perf_counter(), None, None
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {response.read()[:200]!r}"}
        if not stream:
            usage = json.loads(response.read())["usage"]
        for line in response if stream else ():
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                choice = event["choices"][0] if event["choices"] else {}
                if first is None and (choice.get("text") or choice.get("delta", {}).get("content")):
                    first = time.perf_counter() - t0
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()
    if usage is None:
        return {"error": "no usage in the answer"}
    return {"latency_s": time.perf_counter() - t0, "first_token_s": first, "tokens": usage["completion_tokens"]}


def _in_process(gen: ResponseGenerator, requests: int, max_tokens: int) -> float:
    """Completion tokens/s of the levels' ``requests`` requests made in this process one after
    another, each of the same kind, prompt and seed as the server gets (a chat-tuned model
    may end a plain completion at once, so timing completions alone can measure nothing)."""
    tokens, began = 0, time.perf_counter()
    for index in range(requests):
        chat, prompt = _request_kind(index)
        cfg = GenerationConfig(max_new_tokens=max_tokens, seed=index)
        for _ in gen.chat([Message("user", prompt)], cfg) if chat else gen.complete(prompt, cfg):
            pass
        tokens += gen.last_stats.completion_tokens
    return tokens / (time.perf_counter() - began)


@dataclass(frozen=True)
class WorkerLevel:
    """One level through the worker: ``clients`` at once, the completion tokens they got, and how fast."""

    clients: int
    completion_tokens: int
    tokens_per_s: float


def worker_levels(model_dir: Path, levels: list[int], requests: int, max_tokens: int) -> list[WorkerLevel]:
    """Each level of ``levels`` clients through the server's worker, the server levels'
    ``requests`` requests a level (request i as ``_request_kind(i)``, seed i)."""
    threads = torch.get_num_threads()
    try:
        return asyncio.run(_worker_levels(model_dir, levels, requests, max_tokens))
    finally:
        gc.unfreeze()  # the worker froze this process's objects, as the server does its own
        torch.set_num_threads(threads)


async def _worker_levels(model_dir: Path, levels: list[int], requests: int, max_tokens: int) -> list[WorkerLevel]:
    from engine.serving.server import serving_worker  # the web stack loads only for this section, as in bench_server

    loop = asyncio.get_running_loop()
    loaded: asyncio.Future[str | None] = loop.create_future()
    worker = serving_worker(model_dir, None, requests, lambda error: loop.call_soon_threadsafe(loaded.set_result, error))
    worker.start()
    try:
        error = await loaded
        if error is not None:
            raise RuntimeError(f"the worker could not load {model_dir}: {error}")
        await _worker_answer(worker, 0, max_tokens)  # warms up, as the server level's first request
        return [await _worker_level(worker, n, requests, max_tokens) for n in levels]
    finally:
        worker.close()


async def _worker_level(worker: GenerationWorker, clients: int, requests: int, max_tokens: int) -> WorkerLevel:
    waiting = list(range(requests))[::-1]  # popped from the end: request 0 first
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while waiting:
            made = await _worker_answer(worker, waiting.pop(), max_tokens)
            tokens += made  # after the await: ``tokens += await ...`` would read it before

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return WorkerLevel(clients, tokens, tokens / (time.perf_counter() - began))


async def _worker_answer(worker: GenerationWorker, index: int, max_tokens: int) -> int:
    """Request ``index`` through the worker, as the server's endpoints make it: its completion tokens."""
    chat, prompt = _request_kind(index)
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


def _percentiles(values: list[float]) -> dict:
    """p50, p95 (nearest rank) and the maximum."""
    ordered = sorted(values)
    if not ordered:
        return {}
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {"p50": rank(0.50), "p95": rank(0.95), "max": ordered[-1]}


class _ServerLoad:
    """Context manager: the share of the CPU that processes other than this one and the
    server (``pid``) used meanwhile (``OtherLoad`` would count the running server as other)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.share: float | None = None

    def _server_ticks(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[11]) + int(fields[12])  # utime + stime

    def __enter__(self) -> _ServerLoad:
        self.others, self.server = OtherLoad().__enter__(), self._server_ticks()
        return self

    def __exit__(self, *exc) -> None:
        server = self._server_ticks()
        start, end = self.others.start, _cpu_ticks()
        self.others.__exit__(*exc)
        if self.others.share is None or server is None or self.server is None or start is None or end is None:
            return
        self.share = max(0.0, self.others.share - (server - self.server) / max(1, end[1] - start[1]))


def _level(host: str, port: int, server_pid: int, streams: int, requests: int, max_tokens: int) -> dict:
    """``requests`` streamed requests from ``streams`` client threads at once, each taking
    the next request not yet sent as soon as its last one is answered (so ``streams`` stay
    open until the last ones: a client whose replies ended early does not sit idle while
    another works through a fixed share): aggregate tokens/s, time to first token, errors."""
    results: list[dict] = []
    waiting: queue.SimpleQueue[int] = queue.SimpleQueue()
    for r in range(requests):
        waiting.put(r)

    def client() -> None:
        while True:
            try:
                r = waiting.get_nowait()
            except queue.Empty:
                return
            results.append(_server_request(host, port, r, max_tokens, stream=True))

    threads = [threading.Thread(target=client) for _ in range(streams)]
    with _ServerLoad(server_pid) as load:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    # How many requests were open on average: below ``streams`` when a client is between
    # two requests, or when some have finished and the rest run on (chats that end early).
    in_flight = sum(r["latency_s"] for r in ok) / wall
    return {"streams": streams, "requests": requests, "succeeded": len(ok),
            "errors": [r["error"] for r in results if "error" in r][:5], "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "in_flight": in_flight, "results": ok,
            "first_token_s": _percentiles([r["first_token_s"] for r in ok if r["first_token_s"] is not None]),
            "other_load": load.share}


def bench_server(model_dir: Path, clients: int, per_client: int, max_tokens: int, workdir: Path) -> dict:
    """The levels of ``LEVELS`` up to ``clients`` (and ``clients`` itself), each sending
    ``clients * per_client`` streamed requests, to a real server process on 127.0.0.1
    (interface.py serve on a free port). Every request must succeed. ``levels`` holds a
    row per level; the keys beside it are the top level's (``clients`` at once), as the
    single run this section made before."""
    from engine.serving.listening import serving_subprocess

    # The same model in this process, one request at a time, with the server's threads:
    # the yardstick for what serving costs.
    threads = torch.get_num_threads()
    gen = ResponseGenerator(str(model_dir))
    serving_threads = hardware.configure_cpu_threads_for_serving()
    _in_process(gen, 4, max_tokens)  # warms up
    direct = _in_process(gen, clients * per_client, max_tokens)
    torch.set_num_threads(threads)
    params = gen.model.num_params()
    del gen
    levels = sorted({n for n in LEVELS if n <= clients} | {clients})
    requests = clients * per_client
    # The same levels through the server's worker in this process, without HTTP: how far
    # batching alone goes, and so what serving over HTTP costs at each level.
    engine = worker_levels(model_dir, levels, requests, max_tokens)
    command = [sys.executable, str(ROOT / "interface.py"), "serve", "--model-dir", str(model_dir), "--port", "0",
               "--max-waiting", str(requests)]
    with OtherLoad() as load, serving_subprocess(command, workdir / "server.log") as child:
        address = urlsplit(child.url)
        _server_request(address.hostname, address.port, 0, max_tokens, stream=True)  # warms the server up
        rows = [_level(address.hostname, address.port, child.process.pid, n, requests, max_tokens) for n in levels]
    top = rows[-1]  # ``clients`` streams: the run this section made before it had levels
    results = top["results"]
    for row in rows:
        row.pop("results")
    one = rows[0]["tokens_per_s"] if rows[0]["streams"] == 1 else None
    for row, alone in zip(rows, engine):
        row["vs_one_stream"] = row["tokens_per_s"] / one if one else None
        row["worker_tokens_per_s"], row["worker_completion_tokens"] = alone.tokens_per_s, alone.completion_tokens
        row["worker_vs_one"] = alone.tokens_per_s / engine[0].tokens_per_s if one else None
    return {"clients": clients, "per_client": per_client, "max_tokens": max_tokens, "params": params,
            "levels": rows, "requests": top["requests"], "succeeded": top["succeeded"], "errors": top["errors"],
            "latency_s": _percentiles([r["latency_s"] for r in results]),
            "first_token_s": top["first_token_s"], "completion_tokens": top["completion_tokens"],
            "wall_s": top["wall_s"], "tokens_per_s": top["tokens_per_s"],
            "direct_tokens_per_s": direct, "threads": serving_threads, "other_load": load.share,
            "cpu": _cpu_summary(), "load_average": _load_average()}


def _cpu_summary() -> str:
    """The CPU's model and its widest vector units, as lscpu would say them."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        return "unknown"
    units = ("AMX" if "amx_tile" in flags else "") + (", AVX-512" if "avx512f" in flags else "") or (
        "AVX2 only" if "avx2" in flags else "no AVX2")
    return f"{name or 'unknown CPU'} ({units.lstrip(', ')}), {hardware.usable_cpu_cores()} core(s)"


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages when the run ended (None off Unix)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
