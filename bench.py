#!/usr/bin/env python3
"""Benchmark: training and generation speed, the data path, quality per minute, the server under load.

Times our own code paths (the trainer's step, the generator's token loop, the
tokenizer wrappers), then runs Hugging Face transformers' GPT-2 at the identical
configuration (``../shared/bench/reference_hf.py``) in a subprocess, after ours and
never at the same time, and prints the ratios ours/theirs.

    python bench.py                    # everything but the quality run (a few minutes)
    python bench.py --quick            # fewer steps, 1x corpus only (about a minute)
    python bench.py --quality          # adds a 165 s training run on tinyshakespeare
    python bench.py --json out.json    # also write every number as JSON
    python bench.py --skip train,gen,data,reference   # only the server load run (16 clients x 4 requests)

The training section also shows the CPU's instruction set as PyTorch sees it, which
kernels the step ran (fused AdamW, the fused loss head, the attention path), and where
a step's time goes by kind of work (torch.profiler): the next bottleneck to look at.

``transformers`` is needed for the reference only (``pip install -r
requirements-bench.txt``); without it that section is skipped with a note.

The machine matters: two processes that both use every core slow each other down
many times over. Each section therefore waits (up to ``--wait-idle`` seconds) for
the CPU to go quiet, measures how much CPU other processes took while it ran, and
flags numbers taken on a busy machine.
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from engine.data.sources import open_source, source_from_text
from engine.data.tokenizer import chunk_text, train_tokenizer
from engine.data.windows import TokenDataset, tokenize_source
from engine.runtime import hardware
from engine.training.events import RunStarted, StepDone
from model import GPT, Decoder, ModelConfig
from response_generator import (
    CHAT_STOPS,
    GenerationConfig,
    ResponseGenerator,
    TextStreamer,
)
from trainer import TrainConfig, make_optimizer, train_step

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
DEFAULT_CORPUS = SHARED / "data" / "tinyshakespeare.txt"
DEFAULT_REFERENCE = SHARED / "bench" / "reference_hf.py"
BUSY_WARNING = 0.05  # other processes above this share of the CPU make a number suspect


# ---------------------------------------------------------------------------------------
# How busy is the machine?

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


# ---------------------------------------------------------------------------------------
# The machine's matrix-product rate (the denominator of MFU)

def _time_it(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def square_matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> dict:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = _time_it(lambda: a @ b, repeats)
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
    times = _time_it(step, repeats, warmup=1)
    return {"gflops_median": flops / statistics.median(times) / 1e9, "gflops_best": flops / min(times) / 1e9}


def bench_matmul(cfg: ModelConfig, batch: int, quick: bool) -> dict:
    reps = 5 if quick else 10
    out = {"square_fp32": square_matmul_gflops(1024, torch.float32, reps),
           "model_gemms_fp32": model_gemm_gflops(cfg, batch, 3 if quick else 5)}
    if hardware.cpu_has_native_bf16() or torch.cuda.is_available():
        out["square_bf16"] = square_matmul_gflops(1024, torch.bfloat16, reps)
    return out


# ---------------------------------------------------------------------------------------
# Training

def flops_per_token(model: GPT) -> int:
    """6 x (every weight a token passes through: all but the position table, the tied
    head counted as the matrix product it is) + the attention scores and mixing."""
    cfg = model.config
    n = model.num_params() - model.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.context


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


# Categories of a training step's time, by aten op (see ``step_category``).
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::linear", "aten::matmul"}
LOSS_OPS = {"aten::cross_entropy_loss", "aten::log_softmax", "aten::_log_softmax", "aten::_log_softmax_backward_data",
            "aten::nll_loss", "aten::nll_loss_nd", "aten::nll_loss_forward", "aten::nll_loss_backward"}
ATTENTION_OPS = {"aten::softmax", "aten::_softmax", "aten::_softmax_backward_data", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
ELEMENTWISE_OPS = {f"aten::{name}" for name in (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "where", "gelu", "gelu_backward",
    "native_layer_norm", "native_layer_norm_backward", "random_", "uniform_", "bernoulli_", "ge", "bitwise_and",
    "bitwise_right_shift", "bitwise_right_shift_", "fill_", "zero_", "copy_", "clone", "cat", "contiguous", "triu",
    "masked_fill", "masked_fill_", "neg", "exp", "exp_", "log", "log_", "clamp", "clamp_", "eq", "ne", "abs")}
STEP_CATEGORIES = ("matrix products", "cross-entropy / loss head", "attention softmax", "element-wise passes",
                   "optimizer (AdamW, clipping)", "other aten ops")


def step_category(name: str, ancestors: list[str]) -> str:
    """The category of one aten op of a training step, from its name and the names of
    the profiler events around it (the autograd node, the optimizer's step...).

    Matrix products count as such wherever they run, the loss head's included, so the
    plain and the fused head compare like with like; everything else inside the loss
    (its softmax, its passes) counts as the loss head."""
    if name in MATMUL_OPS:
        return "matrix products"
    if (name.startswith(("aten::_fused_adam", "aten::_foreach_")) or name == "aten::linalg_vector_norm"
            or any(a.startswith(("Optimizer.", "aten::_foreach_")) for a in ancestors)):
        return "optimizer (AdamW, clipping)"  # clip_grad_norm_: per-tensor norms, a total, one scaling
    if name in LOSS_OPS or any("FusedHeadLoss" in a or a in LOSS_OPS or "LogSoftmaxBackward" in a
                               or "NllLossBackward" in a for a in ancestors):
        return "cross-entropy / loss head"
    if name in ATTENTION_OPS:
        return "attention softmax"
    if name in ELEMENTWISE_OPS:
        return "element-wise passes"
    return "other aten ops"


def step_breakdown(step, steps: int) -> dict:
    """Where a training step's time goes: ``step()`` run ``steps`` times under
    torch.profiler, the self CPU time of every aten op summed by ``step_category``,
    in ms per step and % of the profiled step, largest first. What no aten op
    accounts for (Python, the autograd engine, the profiler itself) is its own row.

    Also which kernels ran, read off the event names: fused AdamW, the fused loss
    head, and the attention path (SDPA, or the explicit one with dropout)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    totals = dict.fromkeys(STEP_CATEGORIES, 0.0)
    names = set()
    for event in prof.events():
        names.add(event.name)
        if not event.name.startswith("aten::"):
            continue
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        totals[step_category(event.name, ancestors)] += event.self_cpu_time_total / 1e3 / steps
    totals["not in aten ops (Python, autograd, profiler)"] = max(0.0, wall_ms - sum(totals.values()))
    rows = sorted(({"category": name, "ms": ms, "pct": 100 * ms / wall_ms} for name, ms in totals.items()),
                  key=lambda row: -row["ms"])
    sdpa = any("scaled_dot_product" in name for name in names)
    return {
        "steps": steps, "step_ms": wall_ms, "categories": rows,
        "kernels": {
            "fused_adamw": any(name.startswith("aten::_fused_adamw") for name in names),
            "fused_loss": any(name.startswith("FusedHeadLoss") for name in names),
            "attention": "scaled_dot_product_attention" if sdpa else "explicit, with dropout "
                                                                    "(model.causal_attention_with_dropout)",
        },
    }


def bench_training(cfg: ModelConfig, batch: int, precision: str, steps: int, warmup: int,
                   seed: int = 0, profile_steps: int = 3) -> dict:
    runtime = hardware.detect_runtime("cpu", precision)
    torch.manual_seed(seed)
    model = GPT(cfg)
    optimizer = make_optimizer(model, TrainConfig(), runtime)
    model.train()
    # Random tokens through the real data path: TokenDataset windows, as in training.
    n_windows = (warmup + steps) * batch + 4
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, n_windows * (cfg.context + 1) + 2,
                                                  dtype=np.uint16)
    dataset = TokenDataset(tokens, cfg.context, val_fraction=0.01)
    plan = dataset.epoch_plan(seed, 0, batch)
    step_times, prep_times, losses = [], [], []
    with OtherLoad() as load:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            x, y = dataset.train_batch(plan, i % plan.n_batches)
            t1 = time.perf_counter()
            losses.append(train_step(model, optimizer, x, y, 3e-4, runtime, grad_clip=1.0))
            t2 = time.perf_counter()
            if i >= warmup:
                prep_times.append(t1 - t0)
                step_times.append(t2 - t1)
    rss = peak_rss_mb()  # before the products below add their own tensors
    tokens_per_step = batch * cfg.context
    step = spread(step_times)
    fpt = flops_per_token(model)
    paired = {}
    if runtime.autocast_dtype is None:
        # The machine's speed drifts by tens of percent over a minute, so a rate taken
        # later is a poor denominator: a few more steps, each followed by the same
        # matrix products on their own, and the median of the step-by-step ratios.
        gemms, gemm_flops = model_gemms(cfg, batch)
        ratios = []
        for i in range(max(3, steps // 2)):
            x, y = dataset.train_batch(plan, (warmup + steps + i) % plan.n_batches)
            t0 = time.perf_counter()
            train_step(model, optimizer, x, y, 3e-4, runtime, grad_clip=1.0)
            t1 = time.perf_counter()
            gemms()
            t2 = time.perf_counter()
            ratios.append(fpt * tokens_per_step / gemm_flops * (t2 - t1) / (t1 - t0))
        paired["mfu_model_paired"] = statistics.median(ratios)
    # Last, so that the profiler's overhead touches none of the timings above.
    later = iter(range(warmup + steps + max(3, steps // 2), 10**9))

    def profiled_step() -> None:
        x, y = dataset.train_batch(plan, next(later) % plan.n_batches)
        train_step(model, optimizer, x, y, 3e-4, runtime, grad_clip=1.0)

    breakdown = step_breakdown(profiled_step, profile_steps)
    return {
        **paired,
        "breakdown": breakdown,
        "precision": runtime.precision, "steps": steps, "warmup": warmup,
        "step_s": step,
        "tokens_per_s": {"median": tokens_per_step / step["median"], "min": tokens_per_step / step["max"],
                         "max": tokens_per_step / step["min"]},
        "flops_per_token": fpt,
        "achieved_gflops": fpt * tokens_per_step / step["median"] / 1e9,
        "batch_prep_ms": statistics.median(prep_times) * 1e3,
        "batch_prep_pct_of_step": 100 * statistics.median(prep_times) / step["median"],
        "loss_first": losses[0], "loss_last": losses[-1],
        "params": model.num_params(),
        "peak_rss_mb": rss,
        "other_load": load.share,
    }


# ---------------------------------------------------------------------------------------
# Generation

class _NoEndTokenizer:
    """The tokenizer minus its end-of-text id, so every run makes all the requested
    tokens (the reference forces the same with ``min_new_tokens``)."""

    eot_id = -1

    def __init__(self, tok) -> None:
        self.tok = tok

    def decode(self, ids) -> str:
        return self.tok.decode(ids)


def _weights_name(runtime: hardware.Runtime) -> str:
    dtype = runtime.decode_weights or runtime.decode_dtype or torch.float32
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _time_generation(gen: ResponseGenerator, prompt: list[int], cfg: GenerationConfig, use_cache: bool,
                     repeats: int) -> dict:
    rates, first = [], []
    ids: list[int] = []
    for r in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        ids = []
        for token_id in gen.generate_ids(prompt, cfg, use_cache=use_cache):
            if not ids:
                t_first = time.perf_counter() - t0
            ids.append(token_id)
        elapsed = time.perf_counter() - t0
        if r:
            rates.append(len(ids) / elapsed)
            first.append(t_first)
    return {"tokens": len(ids), "tokens_per_s": spread(rates), "first_token_ms": 1e3 * statistics.median(first),
            "ids": ids}


def bench_generation(cfg: ModelConfig, tokenizer, new_tokens: int, prompt_len: int, repeats: int,
                     seed: int = 0, plain_only: bool = False) -> dict:
    torch.manual_seed(seed)
    model = GPT(cfg)
    # What a user gets (fp16 weight matrices where the CPU has the kernel), and fp32
    # throughout when that differs, so the table shows what the halved reads buy.
    runtime = hardware.detect_runtime("cpu")
    gen = ResponseGenerator.from_model(model, _NoEndTokenizer(tokenizer), runtime)
    exact = ResponseGenerator.from_model(model, _NoEndTokenizer(tokenizer), hardware.detect_runtime("cpu", "fp32"))
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(1, cfg.vocab_size, (prompt_len,), generator=g).tolist()
    n = min(new_tokens, cfg.context - prompt_len)
    # The reference's settings: top-k 50, temperature 0.8, nothing else.
    plain = GenerationConfig(max_new_tokens=n, temperature=0.8, top_k=50, top_p=1.0, repetition_penalty=1.0,
                             seed=seed)
    ours = GenerationConfig(max_new_tokens=n, seed=seed)  # what a user gets: + top-p 0.95, penalty 1.1
    out: dict = {"new_tokens": n, "prompt_tokens": prompt_len, "weights": _weights_name(runtime)}
    if plain_only:
        with OtherLoad() as load:
            out["cached"] = _time_generation(gen, prompt, plain, True, repeats)
            out["cached_default_sampling"] = _time_generation(gen, prompt, ours, True, repeats)
            if runtime.decode_weights is not None:
                out["cached_fp32"] = _time_generation(exact, prompt, plain, True, repeats)
        for key in ("cached", "cached_default_sampling", "cached_fp32"):
            out.get(key, {}).pop("ids", None)
        out["other_load"] = load.share
        return out
    with OtherLoad() as load:
        out["cached"] = _time_generation(gen, prompt, plain, True, repeats)
        if runtime.decode_weights is not None:  # else the same thing twice
            out["cached_fp32"] = _time_generation(exact, prompt, plain, True, repeats)
            out["cached_fp32"].pop("ids")
        out["cached_default_sampling"] = _time_generation(gen, prompt, ours, True, repeats)
        out["uncached"] = _time_generation(exact, prompt, plain, False, max(1, repeats - 1))
    out["other_load"] = load.share
    same_precision = out.get("cached_fp32", out["cached"])  # the uncached path is the fp32 model
    out["cache_speedup"] = same_precision["tokens_per_s"]["median"] / out["uncached"]["tokens_per_s"]["median"]
    # Text streaming: what decoding ids into safe-to-show text adds per token.
    ids = out["cached"].pop("ids")
    for key in ("cached_default_sampling", "uncached"):
        out[key].pop("ids")
    if hasattr(tokenizer, "vocab_size"):
        for name, stops in (("stream_us_per_token", ()), ("stream_chat_us_per_token", CHAT_STOPS)):
            def push_all(stops=stops) -> None:
                streamer = TextStreamer(tokenizer, stops)
                for i in ids:
                    streamer.push(i)
                streamer.flush()
            out[name] = 1e6 * statistics.median(_time_it(push_all, 5, warmup=1)) / max(1, len(ids))
    return out


# ---------------------------------------------------------------------------------------
# The data path: tokenizer training and encoding

def _library_tokenizer(tok):
    """The same trained tokenizer loaded straight into its library (no wrapper)."""
    if tok.kind == "bpe":
        from tokenizers import Tokenizer

        lib = Tokenizer.from_str(tok.to_bytes().decode("utf-8"))
        lib.encode_special_tokens = True  # the wrapper's setting: same work
        return lambda pieces: [e.ids for e in lib.encode_batch(pieces, add_special_tokens=False)]
    import sentencepiece as spm

    lib = spm.SentencePieceProcessor(model_proto=tok.to_bytes())
    threads = hardware.usable_cpu_cores()
    return lambda pieces: lib.encode(pieces, num_threads=threads)


def bench_data(corpus: Path, scales: list[int], vocab: int, workdir: Path) -> list[dict]:
    rows = []
    text = corpus.read_text(encoding="utf-8")
    for scale in scales:
        path = corpus if scale == 1 else workdir / f"{corpus.stem}_x{scale}.txt"
        if scale != 1:
            path.write_text(text * scale, encoding="utf-8")
        n_bytes = path.stat().st_size
        for kind in ("bpe", "sentencepiece"):
            with OtherLoad() as load:
                source = open_source(str(path))
                t0 = time.perf_counter()
                tok = train_tokenizer(kind, source.sample_for_tokenizer(), vocab)
                train_s = time.perf_counter() - t0
                pieces = list(chunk_text(path.read_text(encoding="utf-8"), 16_000))
                encode = _library_tokenizer(tok)
                e2e, wrapper, library = [], [], []
                # The machine's speed drifts by tens of percent over seconds, so the three
                # are timed back to back, in a rotating order, and compared attempt by
                # attempt (the median of the per-attempt ratios), never best against best.
                for attempt in range(5 if scale == 1 else 3):
                    cache = workdir / f"cache-{kind}-{scale}-{attempt}"
                    jobs = [(e2e, lambda cache=cache: tokenize_source(source, tok, cache)),  # read, encode, cache
                            (wrapper, lambda: tok.encode_batch(pieces)),  # our wrapper alone
                            (library, lambda: encode(pieces))]  # the library alone
                    for times, job in jobs[attempt % 3:] + jobs[:attempt % 3]:
                        t0 = time.perf_counter()
                        result = job()
                        times.append(time.perf_counter() - t0)
                        if times is e2e:
                            ids = result
                        elif times is library:
                            direct = result
                e2e_s, wrapper_s, direct_s = min(e2e), min(wrapper), min(library)
                t0 = time.perf_counter()
                tokenize_source(open_source(str(path)), tok, cache)  # the second time: from the cache
                cached_s = time.perf_counter() - t0
            rows.append({
                "tokenizer": kind, "corpus": f"{corpus.name} x{scale}", "mb": n_bytes / 1e6,
                "vocab": tok.vocab_size, "train_s": train_s, "tokens": len(ids),
                "bytes_per_token": n_bytes / max(1, len(ids)),
                "encode_mb_s": n_bytes / 1e6 / e2e_s, "wrapper_mb_s": n_bytes / 1e6 / wrapper_s,
                "library_mb_s": n_bytes / 1e6 / direct_s,
                "wrapper_overhead_pct": 100 * (statistics.median(w / d for w, d in zip(wrapper, library)) - 1),
                "end_to_end_overhead_pct": 100 * (statistics.median(e / d for e, d in zip(e2e, library)) - 1),
                "library_tokens": sum(len(p) for p in direct), "cached_load_ms": 1e3 * cached_s,
                "other_load": load.share,
            })
    return rows


# ---------------------------------------------------------------------------------------
# The reference: Hugging Face GPT-2 at the same configuration

def run_reference(script: Path, cfg: ModelConfig, batch: int, steps: int, warmup: int, new_tokens: int,
                  prompt_len: int, repeats: int, only: str = "") -> dict:
    """reference_hf.py at our configuration; ``only`` "train" or "gen" runs that half alone."""
    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed (pip install -r requirements-bench.txt)"}
    if not script.exists():
        return {"skipped": f"{script} not found"}
    cmd = [sys.executable, str(script), "--d-model", str(cfg.d_model), "--n-layer", str(cfg.n_layer),
           "--n-head", str(cfg.n_head), "--seq-len", str(cfg.context), "--vocab", str(cfg.vocab_size),
           "--dropout", str(cfg.dropout), "--batch", str(batch), "--train-steps", str(steps),
           "--warmup", str(warmup), "--gen-tokens", str(new_tokens), "--prompt-len", str(prompt_len),
           "--gen-repeats", str(repeats), "--device", "cpu", "--dtype", "float32"]
    if only:
        cmd.append("--skip-gen" if only == "train" else "--skip-train")
    with OtherLoad() as load:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"the reference failed (exit {proc.returncode}): {tail[0]}"}
    result = json.loads(lines[-1])
    # The child's CPU counts as ours here: what is left is other processes.
    result["other_load"] = load.share
    return result


def race(script: Path, cfg: ModelConfig, gen_cfg: ModelConfig, tokenizer, batch: int, steps: int, warmup: int,
         new_tokens: int, prompt_len: int, repeats: int, rounds: int, max_wait: float) -> dict:
    """Ours, then theirs, back to back, ``rounds`` times, for training and for generation.

    The speed of a shared machine drifts over minutes, so each ratio compares two
    measurements taken one right after the other, never at the same time.
    """
    out: dict = {"rounds": []}
    for _ in range(rounds):
        row = {"ours_train": measure_when_quiet(
            lambda: bench_training(cfg, batch, "fp32", steps, warmup), max_wait)["tokens_per_s"]["median"]}
        ref = measure_when_quiet(lambda: run_reference(script, cfg, batch, steps, warmup, new_tokens, prompt_len,
                                                       repeats, only="train"), max_wait)
        if "skipped" in ref:
            return ref
        out["reference"] = ref
        row["theirs_train"] = ref["train_tokens_per_s"]
        gen = measure_when_quiet(lambda: bench_generation(gen_cfg, tokenizer, new_tokens, prompt_len, repeats,
                                                          plain_only=True), max_wait)
        row["ours_gen"] = gen["cached"]["tokens_per_s"]["median"]
        row["ours_gen_fp32"] = gen.get("cached_fp32", gen["cached"])["tokens_per_s"]["median"]
        row["ours_gen_default"] = gen["cached_default_sampling"]["tokens_per_s"]["median"]
        ref = measure_when_quiet(lambda: run_reference(script, cfg, batch, steps, warmup, new_tokens, prompt_len,
                                                       repeats, only="gen"), max_wait)
        if "skipped" in ref:
            return ref
        row["theirs_gen"] = ref["gen_tokens_per_s_median"]
        row["train_ratio"] = row["ours_train"] / row["theirs_train"]
        row["gen_ratio"] = row["ours_gen"] / row["theirs_gen"]
        row["gen_ratio_fp32"] = row["ours_gen_fp32"] / row["theirs_gen"]
        row["gen_ratio_default"] = row["ours_gen_default"] / row["theirs_gen"]
        out["rounds"].append(row)
    out["gen_weights"] = gen["weights"]
    for key in ("ours_train", "theirs_train", "ours_gen", "ours_gen_fp32", "ours_gen_default", "theirs_gen",
                "train_ratio", "gen_ratio", "gen_ratio_fp32", "gen_ratio_default"):
        out[key] = spread([row[key] for row in out["rounds"]])
    return out


# ---------------------------------------------------------------------------------------
# Quality per minute: the default CPU setup, a fixed time budget

def bench_quality(corpus: Path, minutes: float, workdir: Path) -> dict:
    from trainer import Trainer

    try:
        from engine.app.cli import DEFAULT_EPOCHS
    except ImportError:  # the command line is not needed to train; fall back to its documented default
        DEFAULT_EPOCHS = 3
    trainer = Trainer(str(workdir / "quality_model"), "bpe", train_overrides={"max_minutes": minutes})
    losses: list[float] = []
    started: list[RunStarted] = []

    def on_event(event) -> None:
        if isinstance(event, StepDone):
            losses.append(event.loss)
        elif isinstance(event, RunStarted):
            started.append(event)

    with OtherLoad() as load:
        t0 = time.perf_counter()
        result = trainer.train(open_source(str(corpus)), DEFAULT_EPOCHS, on_event=on_event)
        wall = time.perf_counter() - t0
    final = result.final_eval
    cfg, run = trainer.model.config, trainer.progress.run
    text = corpus.read_text(encoding="utf-8", errors="replace")
    held_out = trainer.tokenizer.encode(text[-len(text) // 20:])[-2048:]  # from the validation tail
    return {
        "half_weights": bench_half_weights(trainer.model, held_out) if hardware.cpu_half_weights_available() else None,
        "minutes": minutes, "epochs_requested": DEFAULT_EPOCHS, "stopped": result.stopped_early or "finished",
        "val_bpb": final.bpb if final else None, "val_loss": final.val_loss if final else None,
        "steps": result.steps, "tokens_seen": trainer.progress.tokens_seen,
        "train_tokens": started[0].train_tokens if started else None,
        "wall_s": wall, "final_train_loss": losses[-1] if losses else None,
        "config": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                   "context": cfg.context, "vocab": cfg.vocab_size, "dropout": cfg.dropout,
                   "batch": run.batch_size, "lr": trainer.config.learning_rate,
                   "warmup_steps": min(trainer.config.warmup_steps, max(1, run.total_steps // 10)),
                   "min_lr_ratio": trainer.config.min_lr_ratio,
                   "precision": trainer.runtime.precision},
        "other_load": load.share,
    }


def bench_half_weights(model: GPT, ids: list[int]) -> dict:
    """What generation's fp16 weights cost in quality: held-out text through the Decoder
    one token at a time, with fp32 and with fp16 weight matrices. Bits per token of each
    and how often the two agree on the most likely next token."""
    model = model.to("cpu").eval()
    window = model.config.context
    out: dict = {"tokens": 0}
    tops = {}
    for name, matrix_dtype in (("fp32", None), ("fp16", torch.float16)):
        decoder, nats, top = Decoder(model, matrix_dtype=matrix_dtype), 0.0, []
        for begin in range(0, len(ids) - 1, window):
            chunk, cache = ids[begin:begin + window + 1], decoder.new_cache()
            for i in range(len(chunk) - 1):
                logits = decoder.step([chunk[i]], cache)
                nats += (torch.logsumexp(logits, 0) - logits[chunk[i + 1]]).item()
                top.append(int(logits.argmax()))
        out["tokens"], tops[name] = len(top), top
        out[f"{name}_bits_per_token"] = nats / max(1, len(top)) / math.log(2)
    out["top1_agreement"] = sum(a == b for a, b in zip(tops["fp32"], tops["fp16"])) / max(1, out["tokens"])
    return out


# ---------------------------------------------------------------------------------------
# The server under load: many clients at once, on 127.0.0.1 only, a fixed number of requests

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


# ---------------------------------------------------------------------------------------
# Printing

def _load_note(share: float | None) -> str:
    if share is None or share < BUSY_WARNING:
        return ""
    return f"   !! other processes used {100 * share:.0f}% of the CPU meanwhile: unreliable"


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _tps(d: dict) -> str:
    return f"{d['median']:,.0f} tok/s (min {d['min']:,.0f}, max {d['max']:,.0f})"


def print_report(r: dict) -> None:
    env = r["environment"]
    _table("Environment", [
        ("CPU", f"{env['cpu']} ({env['cores']} cores, torch threads {env['threads']}, "
                f"native bf16: {'yes' if env['native_bf16'] else 'no'})"),
        ("software", f"Python {env['python']}, torch {env['torch']}"),
        ("model", f"d_model {env['config']['d_model']}, {env['config']['n_layer']} layers, "
                  f"{env['config']['n_head']} heads, context {env['config']['context']}, "
                  f"vocab {env['config']['vocab']}, batch {env['config']['batch']}, dropout {env['config']['dropout']}"),
    ])
    mm = r["matmul"]
    rows = [("fp32 1024^3 matmul", f"{mm['square_fp32']['gflops_median']:.0f} GFLOP/s "
                                   f"(best {mm['square_fp32']['gflops_best']:.0f})"),
            ("fp32 model-shaped GEMMs", f"{mm['model_gemms_fp32']['gflops_median']:.0f} GFLOP/s "
                                        f"(best {mm['model_gemms_fp32']['gflops_best']:.0f})")]
    if "square_bf16" in mm:
        rows.append(("bf16 1024^3 matmul", f"{mm['square_bf16']['gflops_median']:.0f} GFLOP/s"))
    _table("Matrix products (MFU denominators)", rows)

    ref = r.get("reference", {})
    isa = r.get("cpu_isa")
    if isa:
        caps = ", ".join(f"{name}={value}" for name, value in isa["caps_set"].items()) or "none set"
        flags = ("not readable (no /proc/cpuinfo)" if isa["flags"] is None else
                 ", ".join(f"{flag} {_yes(present)}" for flag, present in isa["flags"].items()))
        _table("Training: the CPU's instruction set", [
            ("PyTorch CPU kernels", f"{isa['torch_capability']} (torch.backends.cpu.get_cpu_capability())"),
            ("caps in the environment", f"{caps} ({', '.join(ISA_CAPS)})"),
            ("CPU flags", flags),
            ("native bf16", _yes(isa["native_bf16"])),
            ("fp16-weight decode (FBGEMM)", _yes(isa["fp16_weight_decode"]) + " (generation, not training)")])
    for t in r["training"]:
        rows = [("tokens/s", _tps(t["tokens_per_s"]) + _load_note(t["other_load"])),
                ("step", f"{1e3 * t['step_s']['median']:.0f} ms (batch prep {t['batch_prep_ms']:.2f} ms = "
                         f"{t['batch_prep_pct_of_step']:.2f}% of a step)"),
                ("FLOPs/token", f"{t['flops_per_token'] / 1e6:.1f} M -> {t['achieved_gflops']:.0f} GFLOP/s achieved"),
                ("MFU", f"{t['mfu_square']:.0%} of the {t['precision']} 1024^3 rate" +
                 (f", {t['mfu_model']:.0%} of the model-shaped rate" if "mfu_model" in t else "") +
                 (f"; {t['mfu_model_paired']:.0%} of it timed beside each step" if "mfu_model_paired" in t else "")),
                ("peak RSS", f"{t['peak_rss_mb']:,.0f} MB"),
                ("loss", f"{t['loss_first']:.3f} -> {t['loss_last']:.3f} over {t['warmup'] + t['steps']} steps")]
        _table(f"Training ({t['precision']}, {t['params'] / 1e6:.2f}M parameters)", rows)
        b = t["breakdown"]
        k = b["kernels"]
        _table(f"Training ({t['precision']}): kernels that ran", [
            ("fused AdamW", _yes(k["fused_adamw"])),
            ("fused loss head (no logits held)", _yes(k["fused_loss"])),
            ("attention", k["attention"])])
        _table(f"Training ({t['precision']}): where a step's time goes (torch.profiler, {b['steps']} steps, "
               f"self CPU time of aten ops; {b['step_ms']:.0f} ms per profiled step)",
               [(row["category"], f"{row['ms']:7.1f} ms  {row['pct']:5.1f}%") for row in b["categories"]])

    g = r.get("generation")
    if g:
        rows = [("cached, top-k 50 T 0.8", _tps(g["cached"]["tokens_per_s"]) + f"  ({g['weights']} weights)" +
                 _load_note(g["other_load"]))]
        if "cached_fp32" in g:
            rows.append(("cached, fp32 weights (exact)", _tps(g["cached_fp32"]["tokens_per_s"])))
        rows += [("time to first token", f"{g['cached']['first_token_ms']:.1f} ms ({g['prompt_tokens']}-token prompt)"),
                 ("cached, default sampling", _tps(g["cached_default_sampling"]["tokens_per_s"]) +
                  "  (+ top-p 0.95, repetition penalty 1.1)"),
                 ("uncached (reference path, fp32)", _tps(g["uncached"]["tokens_per_s"])),
                 ("what the cache buys", f"{g['cache_speedup']:.1f}x (both fp32)")]
        if "stream_us_per_token" in g:
            rows.append(("text streaming", f"{g['stream_us_per_token']:.0f} us/token plain, "
                                           f"{g['stream_chat_us_per_token']:.0f} us/token with chat stops"))
        _table(f"Generation (batch 1, {g['new_tokens']} new tokens)", rows)

    if r.get("data"):
        print("\n== Data path (MB/s: tokenize_source end to end, our encode_batch, the library alone)")
        print(f"  {'tokenizer':<14} {'corpus':<24} {'train s':>8} {'end-to-end':>11} {'wrapper':>8} {'library':>8} "
              f"{'wrapper +':>10} {'e2e +':>7} {'cache hit':>10} {'bytes/tok':>10}")
        for d in r["data"]:
            print(f"  {d['tokenizer']:<14} {d['corpus']:<24} {d['train_s']:>8.2f} {d['encode_mb_s']:>11.2f} "
                  f"{d['wrapper_mb_s']:>8.2f} {d['library_mb_s']:>8.2f} {d['wrapper_overhead_pct']:>9.1f}% "
                  f"{d['end_to_end_overhead_pct']:>6.1f}% {d['cached_load_ms']:>8.1f}ms "
                  f"{d['bytes_per_token']:>10.2f}{_load_note(d['other_load'])}")
    elif r.get("data_note"):
        print(f"\n== Data path\n  {r['data_note']}")

    race_result = r.get("race", {})
    if ref.get("skipped"):
        print(f"\n== Race against the reference\n  skipped: {ref['skipped']}")
    elif race_result.get("rounds"):
        print(f"\n== Race: ours, then {ref['impl']} (transformers {ref['transformers']}, "
              f"{ref['params'] / 1e6:.2f}M parameters), back to back, {len(race_result['rounds'])} round(s)")
        print(f"  {'round':<6} {'train ours':>11} {'theirs':>8} {'ratio':>7}   {'generate ours':>14} {'theirs':>8} "
              f"{'ratio':>7}   {'ours, default sampling':>22} {'ratio':>7}  (tokens/s)")
        for i, row in enumerate(race_result["rounds"], 1):
            print(f"  {i:<6} {row['ours_train']:>11,.0f} {row['theirs_train']:>8,.0f} {row['train_ratio']:>6.2f}x   "
                  f"{row['ours_gen']:>14,.0f} {row['theirs_gen']:>8,.0f} {row['gen_ratio']:>6.2f}x   "
                  f"{row['ours_gen_default']:>22,.0f} {row['gen_ratio_default']:>6.2f}x")
        tr, gr = race_result["train_ratio"], race_result["gen_ratio"]
        print(f"  ours/theirs, training:   median {tr['median']:.2f}x (min {tr['min']:.2f}x, max {tr['max']:.2f}x)")
        print(f"  ours/theirs, generation: median {gr['median']:.2f}x (min {gr['min']:.2f}x, max {gr['max']:.2f}x)"
              f"  ({race_result['gen_weights']} weights; top-k 50, temperature 0.8 on both sides)")
        gd = race_result["gen_ratio_default"]
        print(f"  ours/theirs, generation with our default sampling (+ top-p 0.95, repetition penalty 1.1): "
              f"median {gd['median']:.2f}x (min {gd['min']:.2f}x, max {gd['max']:.2f}x)")
        if race_result["gen_weights"] != "fp32":
            g32 = race_result["gen_ratio_fp32"]
            print(f"  ours/theirs, generation with fp32 weights (ours {race_result['ours_gen_fp32']['median']:,.0f} "
                  f"tokens/s): median {g32['median']:.2f}x (min {g32['min']:.2f}x, max {g32['max']:.2f}x)")

    sv = r.get("server")
    if sv:
        lat, first = sv["latency_s"], sv["first_token_s"]
        rows = [("requests", f"{sv['succeeded']} of {sv['requests']} succeeded" +
                 ("" if sv["succeeded"] == sv["requests"] else f"  !! FAILED: {'; '.join(sv['errors'])}")),
                ("latency", f"p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s"
                 if lat else "none")]
        if first:
            rows.append(("first token (streams)", f"p50 {first['p50']:.2f} s, p95 {first['p95']:.2f} s"))
        rows.append(("throughput", f"{sv['tokens_per_s']:,.0f} completion tokens/s ({sv['completion_tokens']:,} "
                                   f"in {sv['wall_s']:.1f} s)" + _load_note(sv["other_load"])))
        rows.append(("in-process, one at a time", f"{sv['direct_tokens_per_s']:,.0f} tokens/s (the same model and "
                                                  f"{sv['threads']} thread(s), as the server uses)"))
        _table(f"Server under load ({sv['clients']} clients x {sv['per_client']} requests on 127.0.0.1, "
               f"up to {sv['max_tokens']} tokens each, {sv['params'] / 1e6:.2f}M parameters)", rows)
    elif r.get("server_note"):
        print(f"\n== Server under load\n  {r['server_note']}")

    q = r.get("quality")
    if q:
        c, h = q["config"], q.get("half_weights")
        rows = [
            ("validation bits/byte", f"{q['val_bpb']:.3f}  (classic small-GPT recipe: 2.72; target <= 2.5)"
             + _load_note(q["other_load"])),
            ("validation loss", f"{q['val_loss']:.3f} nats/token"),
            ("steps, tokens", f"{q['steps']} steps, {q['tokens_seen']:,} tokens ({q['stopped']})"),
            ("setup", f"d_model {c['d_model']}, {c['n_layer']} layers, context {c['context']}, vocab {c['vocab']}, "
                      f"batch {c['batch']}, lr {c['lr']:g}, warm-up {c['warmup_steps']}, {c['precision']}")]
        if h:
            rows.append(("generation, fp16 weights", f"{h['fp16_bits_per_token']:.4f} vs {h['fp32_bits_per_token']:.4f} "
                         f"bits/token with fp32 weights; same top token {h['top1_agreement']:.2%} "
                         f"({h['tokens']} held-out tokens)"))
        _table(f"Quality per minute ({q['minutes'] * 60:.0f} s on tinyshakespeare, default CPU setup)", rows)


# ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark custom-llm against Hugging Face GPT-2 on this machine.")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats, 1x corpus only")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH")
    p.add_argument("--quality", action="store_true", help="also train the default CPU setup for a fixed time")
    p.add_argument("--quality-minutes", type=float, default=2.75, help="time budget of the quality run (2.75)")
    p.add_argument("--preset", default="compact", choices=hardware.PRESET_NAMES, help="model size (compact)")
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, help="timed training steps (10; quick 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first (3)")
    p.add_argument("--rounds", type=int, help="ours-then-theirs rounds of the race (5; quick 1)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast training row")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: train,gen,data,reference,server")
    p.add_argument("--server-clients", type=int, default=16, help="clients of the server load run (16)")
    p.add_argument("--server-requests", type=int, default=4, help="requests each client sends, in turn (4)")
    p.add_argument("--server-max-tokens", type=int, default=64, help="max_tokens of each request (64)")
    p.add_argument("--server-model", metavar="DIR",
                   help="serve this model folder (default: train the model size above briefly on the corpus)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="text for the data and quality sections")
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE), help="the reference script")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each section, wait up to this many seconds for the CPU to go quiet (60)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    hardware.configure_cpu()
    _, d_model, n_layer, n_head = hardware.preset_by_name(args.preset)
    cfg = ModelConfig(vocab_size=args.vocab, context=args.context, d_model=args.d_model or d_model,
                      n_layer=args.n_layer or n_layer, n_head=args.n_head or n_head, dropout=args.dropout)
    steps = args.steps or (5 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 5)
    gen_repeats = 2 if args.quick else 3
    new_tokens, prompt_len = 200, 10
    corpus = Path(args.corpus)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    report: dict = {"environment": {
        "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "native_bf16": hardware.cpu_has_native_bf16(), "python": platform.python_version(),
        "torch": torch.__version__, "quick": args.quick,
        "config": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                   "context": cfg.context, "vocab": cfg.vocab_size, "batch": args.batch,
                   "dropout": cfg.dropout},
    }}
    def idle():
        return wait_until_idle(args.wait_idle)

    with tempfile.TemporaryDirectory(prefix="custom-llm-bench-") as tmp:
        workdir = Path(tmp)
        report["training"] = []
        if "train" not in skip:  # first, so that its peak memory is the training's own
            report["cpu_isa"] = cpu_instruction_sets()
            precisions = ["fp32"]
            if hardware.cpu_has_native_bf16() and not args.no_bf16 and not args.quick:
                precisions.append("bf16")
            for precision in precisions:
                report["training"].append(measure_when_quiet(
                    lambda p=precision: bench_training(cfg, args.batch, p, steps, args.warmup), args.wait_idle))
        idle()
        report["matmul"] = bench_matmul(cfg, args.batch, args.quick)
        for t in report["training"]:  # against the matrix-product rate of the same precision
            square = report["matmul"]["square_fp32" if t["precision"] == "fp32" else "square_bf16"]
            t["mfu_square"] = t["achieved_gflops"] / square["gflops_median"]
            if t["precision"] == "fp32":
                t["mfu_model"] = t["achieved_gflops"] / report["matmul"]["model_gemms_fp32"]["gflops_median"]
        tokenizer = None
        if corpus.exists() and not {"gen", "data"} <= skip:
            tokenizer = train_tokenizer("bpe", open_source(str(corpus)).sample_for_tokenizer(), cfg.vocab_size)
        gen_cfg = cfg
        if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
            gen_cfg = ModelConfig(**{**cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
        if "gen" not in skip:
            gen_tok = tokenizer if tokenizer is not None else _NoEndTokenizer(None)
            report["generation"] = measure_when_quiet(
                lambda: bench_generation(gen_cfg, gen_tok, new_tokens, prompt_len, gen_repeats), args.wait_idle)
        if "data" not in skip:
            if corpus.exists():
                idle()
                report["data"] = bench_data(corpus, [1] if args.quick else [1, 10], cfg.vocab_size, workdir)
            else:
                report["data_note"] = f"skipped: {corpus} not found"
        if "reference" not in skip:
            gen_tok = tokenizer if tokenizer is not None else _NoEndTokenizer(None)
            report["race"] = race(Path(args.reference), cfg, gen_cfg, gen_tok, args.batch, steps, args.warmup,
                                  new_tokens, prompt_len, gen_repeats, args.rounds, args.wait_idle)
            report["reference"] = report["race"].pop("reference", report["race"])
        if "server" not in skip:
            if args.server_model or corpus.exists():
                model_dir = Path(args.server_model) if args.server_model else server_model(corpus, cfg, args.batch,
                                                                                           workdir)
                report["server"] = measure_when_quiet(lambda: bench_server(
                    model_dir, args.server_clients, args.server_requests, args.server_max_tokens, workdir),
                    args.wait_idle)
            else:
                report["server_note"] = f"skipped: {corpus} not found (or give --server-model DIR)"
        if args.quality:
            if corpus.exists():
                idle()
                report["quality"] = bench_quality(corpus, args.quality_minutes, workdir)
            else:
                report["quality_note"] = f"skipped: {corpus} not found"

    race_result, ratios = report.get("race", {}), {}
    if race_result.get("rounds"):
        ratios = {"train_tokens_per_s": race_result["train_ratio"], "gen_tokens_per_s": race_result["gen_ratio"],
                  "gen_tokens_per_s_fp32_weights": race_result["gen_ratio_fp32"],
                  "gen_tokens_per_s_default_sampling": race_result["gen_ratio_default"]}
    report["ratios"] = ratios
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
