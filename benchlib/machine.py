"""The machine under the benchmark: how busy it is, its matrix-product rate, its instruction sets.

Two processes that both use every core slow each other down many times over, so a
section waits for a quiet CPU (``wait_until_idle``), measures the share other
processes took while it ran (``OtherLoad``) and is run again if another process cut
in (``measure_when_quiet``). The matrix-product rates are the denominators of MFU.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import torch

from engine.runtime import hardware
from model import ModelConfig

BUSY_WARNING = 0.05  # other processes above this share of the CPU make a number suspect


# -- how busy is the machine? ---------------------------------------------------------------------

def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of the whole machine since boot; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_ticks() -> int:
    """Clock ticks used by this process and the children it has waited for."""
    t = os.times()
    return round((t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


class OtherLoad:
    """Context manager: the share of the machine's CPU that other processes used meanwhile."""

    def __enter__(self) -> OtherLoad:
        self.start, self.own = _cpu_ticks(), _own_ticks()
        self.share: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        end = _cpu_ticks()
        if self.start is None or end is None:
            return
        busy, total = end[0] - self.start[0], end[1] - self.start[1]
        own = _own_ticks() - self.own
        self.share = max(0.0, busy - own) / max(1, total)


def wait_until_idle(max_wait: float, quiet_for: float = 2.0) -> float:
    """Wait until other processes use < 10% of the CPU for ``quiet_for`` seconds.

    Returns the seconds waited; gives up (and lets the section run) after ``max_wait``.
    """
    start = time.monotonic()
    if max_wait <= 0 or _cpu_ticks() is None:
        return 0.0
    quiet_since = time.monotonic()
    while time.monotonic() - start < max_wait:
        before = _cpu_ticks()
        time.sleep(0.5)
        after = _cpu_ticks()
        busy = (after[0] - before[0]) / max(1, after[1] - before[1])
        if busy > 0.10:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_for:
            break
    return time.monotonic() - start


def measure_when_quiet(fn, max_wait: float, tries: int = 3) -> dict:
    """Run ``fn`` (which returns a dict with ``other_load``) after waiting for a quiet CPU;
    if another process still cut in, wait and run it again, keeping the quietest try."""
    best = None
    for _ in range(tries):
        wait_until_idle(max_wait)
        result = fn()
        if best is None or (result.get("other_load") or 0) < (best.get("other_load") or 0):
            best = result
        if (best.get("other_load") or 0) < BUSY_WARNING:
            break
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_it(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds each of ``repeats`` calls of ``fn`` took, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# -- the machine's matrix-product rate (the denominator of MFU) -------------------------------------

def square_matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> dict:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = time_it(lambda: a @ b, repeats)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""),
            "gflops_median": 2 * n**3 / statistics.median(times) / 1e9,
            "gflops_best": 2 * n**3 / min(times) / 1e9}


def model_gemms(cfg: ModelConfig, batch: int):
    """The very fp32 matrix products one training step makes (forward and both backward
    products of every linear layer and the head), as a function, and their FLOPs."""
    m, d = batch * cfg.context, cfg.d_model
    shapes = [(d, 3 * d), (d, d), (d, cfg.d_ff), (cfg.d_ff, d)] * cfg.n_layer + [(d, cfg.vocab_size)]
    tensors = []
    for k, n in shapes:
        x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        tensors.append((x, w, dy))

    def step() -> None:
        for x, w, dy in tensors:
            torch.nn.functional.linear(x, w)  # forward  (m, k) x (k, n)
            dy @ w  # grad of the input    (m, n) x (n, k)
            dy.t() @ x  # grad of the weight   (n, m) x (m, k)

    return step, sum(3 * 2 * m * k * n for k, n in shapes)


def model_gemm_gflops(cfg: ModelConfig, batch: int, repeats: int) -> dict:
    """The rate of ``model_gemms``, timed on their own."""
    step, flops = model_gemms(cfg, batch)
    times = time_it(step, repeats, warmup=1)
    return {"gflops_median": flops / statistics.median(times) / 1e9, "gflops_best": flops / min(times) / 1e9}


def bench_matmul(cfg: ModelConfig, batch: int, quick: bool) -> dict:
    reps = 5 if quick else 10
    out = {"square_fp32": square_matmul_gflops(1024, torch.float32, reps),
           "model_gemms_fp32": model_gemm_gflops(cfg, batch, 3 if quick else 5)}
    if hardware.cpu_has_native_bf16() or torch.cuda.is_available():
        out["square_bf16"] = square_matmul_gflops(1024, torch.bfloat16, reps)
    return out


# -- the CPU's instruction sets -------------------------------------------------------------------

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# Variables that cap the instruction set PyTorch, oneDNN or MKL use (unset: the CPU's best).
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_instruction_sets() -> dict:
    """What the CPU offers and what PyTorch makes of it: the kernel level PyTorch chose
    (``get_cpu_capability``: DEFAULT, AVX2, AVX512...), any environment variable that
    caps it, native bf16, and the relevant flags of /proc/cpuinfo (None off Linux)."""
    flags = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), None)
        if line is not None:
            present = set(line.split(":", 1)[1].split())
            flags = {flag: flag in present for flag in CPU_FLAGS}
    except OSError:
        pass
    return {"torch_capability": torch.backends.cpu.get_cpu_capability(),
            "caps_set": {name: os.environ[name] for name in ISA_CAPS if name in os.environ},
            "native_bf16": hardware.cpu_has_native_bf16(), "flags": flags,
            "fp16_weight_decode": hardware.cpu_half_weights_available()}

