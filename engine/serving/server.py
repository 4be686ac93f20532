"""An OpenAI-compatible HTTP server for one model folder.

    python interface.py serve --model-dir DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Like the menu, the server only parses its input, calls the same generator
(``ResponseGenerator.complete`` and ``.chat``) and formats the result, here as the
OpenAI API's JSON and server-sent events, so editors, chat front-ends and the
official ``openai`` client work with it unchanged. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /health``, and a
chat page for the browser at ``GET /`` that uses the chat endpoint like any client.

One model is in memory. Its generator runs on one worker thread
(``engine.serving.job_queue``), which answers the requests together, one shared forward
pass per token (``engine.serving.batching``), while the event loop keeps reading new ones. The endpoints are ``engine.serving.routes``; this
module holds the settings, builds the app and runs it. Another entry point reuses it
through ``add_serve_arguments(parser)`` and ``run_serve(model_dir, args, gen_defaults)``.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import uvicorn
from fastapi import FastAPI

from engine.folder.model_folder import WEIGHTS_FILE, ModelFolder
from engine.generation.generator import ResponseGenerator
from engine.generation.sampling import GenerationConfig
from engine.runtime import hardware
from engine.serving.api_guard import Gate, install_error_handlers
from engine.serving.job_queue import GenerationWorker, WorkerState
from engine.serving.listening import exposure_warning, open_socket, start_line
from engine.serving.routes import ClientWatch, Routes, chat_messages, generation_config
from engine.serving.step_threads import StepThreads

# The names other modules take from here; the routes and the request -> settings helpers
# live in ``engine.serving.routes`` and are re-exported for the callers that import them here.
__all__ = ["API_KEY_ENV", "ClientWatch", "ServeSettings", "add_serve_arguments", "chat_messages", "create_app",
           "generation_config", "run_serve", "serving_worker"]

log = logging.getLogger(__name__)

API_KEY_ENV = "CUSTOM_LLM_API_KEY"


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
        if not 0 < self.body_timeout_s <= 3600:
            problems.append("--body-timeout must be above 0 and at most 3600 seconds")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("--api-key is empty")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        return cls(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                   max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
                   max_waiting=args.max_waiting, body_timeout_s=args.body_timeout)


# -- the app ------------------------------------------------------------------------------------

def create_app(worker: GenerationWorker, model_id: str, settings: ServeSettings,
               gen_defaults: GenerationConfig, created: int = 0) -> FastAPI:
    """The ASGI app: the gate (key, body size) in front, every failure in the OpenAI shape, the routes."""
    app = FastAPI(title="custom-llm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s)
    install_error_handlers(app)
    Routes(worker, model_id, gen_defaults, settings.max_tokens_cap, created).add_to(app)
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
    g.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="SECONDS",
                   help="a request body must arrive within this time, else 408 (default %(default)g)")


def _prepare(model_dir: Path, settings: ServeSettings | argparse.Namespace,
             runtime: hardware.Runtime | None) -> tuple[ServeSettings, hardware.Runtime, socket.socket]:
    """The settings in force, the runtime and a listening socket; a ValueError says why the server cannot start."""
    if not isinstance(settings, ServeSettings):
        settings = ServeSettings.from_args(settings)
    runtime = runtime or hardware.detect_runtime()
    if not ModelFolder(model_dir).has_model():
        raise ValueError(f"no trained model in {model_dir}; train one first (python interface.py)")
    try:
        sock = open_socket(settings.host, settings.port)
    except OSError as exc:
        raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    return settings, runtime, sock


def serving_worker(model_dir: Path, runtime: hardware.Runtime | None, max_waiting: int,
                   on_loaded: Callable[[str | None], None]) -> GenerationWorker:
    """The server's generation worker for the model in ``model_dir`` (not started): small
    steps on all cores but one (the event loop's), big ones on all while measured faster,
    and the loaded objects frozen. Sets PyTorch's threads for serving."""
    many = torch.get_num_threads()  # the machine's, or what OMP_NUM_THREADS asked for
    few = hardware.configure_cpu_threads_for_serving()
    log.info("generation uses %d thread(s), %d for big batches while faster", few, many)
    return GenerationWorker(lambda: ResponseGenerator(str(model_dir), runtime), max_waiting, on_loaded,
                            threads=StepThreads(few, many), freeze_loaded=True)


def run_serve(model_dir: str | Path, settings: ServeSettings | argparse.Namespace,
              gen_defaults: GenerationConfig | None = None, runtime: hardware.Runtime | None = None,
              output_fn: Callable[[str], None] = print, verbose: bool = False) -> int:
    """Serve the model in ``model_dir`` until Ctrl+C (or SIGTERM). Returns the exit status.

    ``gen_defaults`` are the settings a request gets for the fields it leaves out.
    Prints one line with the URL (and a warning when other machines can reach it).
    The model loads on the worker thread while the server already answers (503 until
    it is ready); a model that cannot load stops the server with exit status 1.
    """
    model_dir = Path(model_dir).expanduser()
    try:
        settings, runtime, sock = _prepare(model_dir, settings, runtime)
    except ValueError as exc:
        output_fn(f"Error: {exc}")
        return 2
    model_id = model_dir.resolve().name
    server: uvicorn.Server | None = None

    def on_loaded(error: str | None) -> None:
        if error is not None:
            output_fn(f"Error: cannot load the model: {error}")
            if server is not None:
                server.should_exit = True

    worker = serving_worker(model_dir, runtime, settings.max_waiting, on_loaded)
    weights = model_dir / WEIGHTS_FILE
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
    return 1 if worker.state is WorkerState.FAILED else 0
