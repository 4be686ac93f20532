"""The server under load: many clients at once, on 127.0.0.1 only, a fixed number of requests.

``bench_server`` starts ``interface.py serve`` as a child process on a free port and
sends it chat and completion requests, streamed and not, from many threads; every
request must succeed. Beside it, the same model in this process, one request at a
time, as the yardstick for what serving costs.
"""
from __future__ import annotations

import http.client
import json
import math
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

from benchlib.machine import OtherLoad
from engine.data.sources import source_from_text
from engine.runtime import hardware
from model import ModelConfig
from response_generator import GenerationConfig, ResponseGenerator

ROOT = Path(__file__).resolve().parents[1]  # the project folder, where interface.py is
SERVER_PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further,", "What is the king's name?",
                  "Speak, speak."]
SERVER_TRAIN_CHARS = 200_000  # the start of the corpus, for a model worth serving in seconds


def server_model(corpus: Path, cfg: ModelConfig, batch: int, workdir: Path) -> Path:
    """A model folder to serve: the benchmark's model size, one epoch on the start of the corpus."""
    from trainer import Trainer

    folder = workdir / "server_model"
    text = corpus.read_text(encoding="utf-8", errors="replace")[:SERVER_TRAIN_CHARS]
    Trainer(str(folder), "bpe", model_overrides={"d_model": cfg.d_model, "n_layer": cfg.n_layer,
                                                 "n_head": cfg.n_head, "context": cfg.context},
            train_overrides={"target_vocab_size": cfg.vocab_size, "batch_size": batch}).train(
        source_from_text(text), 1)
    return folder


def _server_request(host: str, port: int, index: int, max_tokens: int) -> dict:
    """One client's request (chat or completion, streamed or not, by ``index``): latency and tokens."""
    stream, chat = index % 2 == 1, index % 4 < 2
    prompt = SERVER_PROMPTS[index % len(SERVER_PROMPTS)]
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


def _percentiles(values: list[float]) -> dict:
    """p50, p95 (nearest rank) and the maximum."""
    ordered = sorted(values)
    if not ordered:
        return {}
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {"p50": rank(0.50), "p95": rank(0.95), "max": ordered[-1]}


def bench_server(model_dir: Path, clients: int, per_client: int, max_tokens: int, workdir: Path) -> dict:
    """``clients`` threads, each sending ``per_client`` requests one after another, to a real
    server process on 127.0.0.1 (interface.py serve on a free port). Every request must succeed."""
    from engine.serving.listening import serving_subprocess

    # The same model in this process, one request at a time, with the server's threads:
    # the yardstick for what serving costs.
    threads = torch.get_num_threads()
    gen = ResponseGenerator(str(model_dir))
    serving_threads = hardware.configure_cpu_threads_for_serving()
    for _ in range(2):  # the first run warms up
        t0 = time.perf_counter()
        for _ in gen.complete(SERVER_PROMPTS[0], GenerationConfig(max_new_tokens=max_tokens, seed=0)):
            pass
        direct = gen.last_stats.completion_tokens / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    params = gen.model.num_params()
    del gen
    command = [sys.executable, str(ROOT / "interface.py"), "serve", "--model-dir", str(model_dir), "--port", "0",
               "--max-waiting", str(clients * per_client)]
    results: list[dict] = []
    with OtherLoad() as load, serving_subprocess(command, workdir / "server.log") as child:
        address = urlsplit(child.url)

        def client(c: int) -> None:
            for r in range(per_client):
                results.append(_server_request(address.hostname, address.port, c * per_client + r, max_tokens))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "per_client": per_client, "max_tokens": max_tokens, "params": params,
            "requests": clients * per_client, "succeeded": len(ok),
            "errors": [r["error"] for r in results if "error" in r][:5],
            "latency_s": _percentiles([r["latency_s"] for r in ok]),
            "first_token_s": _percentiles([r["first_token_s"] for r in ok if r["first_token_s"] is not None]),
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "direct_tokens_per_s": direct, "threads": serving_threads, "other_load": load.share}

