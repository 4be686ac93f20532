"""The generation section: tokens per second at batch 1, and what fp16 weights cost in quality.

``bench_generation`` times ``ResponseGenerator.generate_ids`` with and without the KV
cache, with the reference's sampling and with ours, and what streaming text adds per
token. ``bench_half_weights`` (run by the quality section, on a trained model) scores
held-out text with fp32 and with fp16 weight matrices.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from benchlib.machine import OtherLoad, spread, time_it
from engine.runtime import hardware
from model import GPT, Decoder, ModelConfig
from response_generator import CHAT_STOPS, GenerationConfig, ResponseGenerator, TextStreamer


class NoEndTokenizer:
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
    gen = ResponseGenerator.from_model(model, NoEndTokenizer(tokenizer), runtime)
    exact = ResponseGenerator.from_model(model, NoEndTokenizer(tokenizer), hardware.detect_runtime("cpu", "fp32"))
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
            out[name] = 1e6 * statistics.median(time_it(push_all, 5, warmup=1)) / max(1, len(ids))
    return out


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

