"""Where the server listens, and running it as a child process.

The socket is opened before anything else (so a taken port is one clear line, and
``--port 0`` gets a free port that the start line then names), and it listens
before that line is printed. A server bound beyond loopback gets a warning.
``serving_subprocess`` starts a server command for tests and the benchmark and
reads its URL back from the start line, whose format lives here beside it.
"""
from __future__ import annotations

import ipaddress
import re
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

START_LINE = re.compile(r"http://\S+/v1")  # the URL in the start line


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is on this machine only (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def exposure_warning(host: str, has_api_key: bool) -> str | None:
    """What to tell the user when other machines can reach the server (None on loopback)."""
    if is_loopback(host):
        return None
    guard = "the API key is the only guard" if has_api_key else "and no API key (--api-key) guards it"
    return (f"Warning: {host} can be reached from other machines. There is no TLS, {guard}, "
            "and anyone who reaches it can use this computer's CPU.")


def start_line(model_id: str, sock: socket.socket) -> str:
    """The line printed when the server starts; ``START_LINE`` finds the URL in it."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    root = f"http://{shown}:{port}"
    return f"Serving {model_id} at {root}/v1 (OpenAI API; GET /health; Ctrl+C stops). Chat in a browser: {root}/"


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one the system picks).

    It listens before the URL is printed, so a client that connects at once waits in
    the backlog until the server accepts, instead of being refused.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class ChildServer:
    url: str  # http://HOST:PORT/v1
    process: subprocess.Popen


@contextmanager
def serving_subprocess(command: list[str], stderr_path: str | Path, ready_timeout_s: float = 60) -> Iterator[ChildServer]:
    """Run a command that starts this server, and yield it once ``/health`` says ok; stop it after.

    For tests and the benchmark. The command should ask for ``--port 0``: the port
    is read from the start line. Stopping is a Ctrl+C (SIGINT), then a kill.
    """
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = process.stdout.readline()
        found = START_LINE.search(line)
        if not found:
            raise RuntimeError(f"the server printed no URL ({line.strip()!r}); see {stderr_path}")
        child = ChildServer(found.group(0), process)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                with urllib.request.urlopen(child.url.removesuffix("/v1") + "/health", timeout=5):
                    break
            except OSError:  # refused, or 503 while loading (HTTPError is an OSError)
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become ready; see {stderr_path}") from None
                time.sleep(0.1)
        yield child
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
