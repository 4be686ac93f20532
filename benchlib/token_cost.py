"""Where a generated token's time goes: the menu's token loop taken apart.

``token_cost`` runs replies through the very loop ``ResponseGenerator`` runs (a
``Reply``: feed, ``Decoder.step``, take) and times its three parts with the thread's
CPU clock, so other processes on the machine do not count:

- the decode step (``Decoder.step``): the network;
- take: drawing the token (``TokenLoop.choose``: top-k, top-p, the draw) and turning
  it into text (``TextStreamer.push``, timed on its own where it runs);
- the loop around them (``Reply.feed`` and the bookkeeping of ``take``).

A second run under ``torch.profiler`` splits the step by kind of operation (matrix
products, attention, norms, element-wise passes, tensor bookkeeping) and what is left
of the step's time beyond the operations themselves: Python and PyTorch's dispatch.
The profiler adds about a microsecond to every operation, so the shares of that run
are a guide; the totals come from the unprofiled runs.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from engine.generation.generator import ResponseGenerator
from engine.generation.prompts import PreparedRequest
from engine.generation.sampling import GenerationConfig
from engine.generation.token_loop import Reply

STEP_LABEL = "decode step"
# Kinds of operation in a decode step, by the aten op's name (first match wins).
OP_KINDS = (
    ("matrix products", ("fbgemm", "linear", "addmm", "aten::mm", "quantized")),
    ("attention", ("scaled_dot_product", "flash_attention", "bmm", "softmax")),
    ("norms", ("layer_norm", "rms_norm", "vector_norm", "hypot", "aten::div")),
    ("element-wise passes", ("gelu", "glu", "aten::add", "aten::mul", "aten::copy_", "aten::sub")),
)
BOOKKEEPING = "tensor bookkeeping (views, slices, allocation)"


def op_kind(name: str) -> str:
    """The kind of a decode step's aten op (``OP_KINDS``), else bookkeeping."""
    return next((kind for kind, keys in OP_KINDS if any(key in name for key in keys)), BOOKKEEPING)


def _timed_reply(gen: ResponseGenerator, request: PreparedRequest) -> tuple[list[int], list[float]]:
    """One reply through the menu's loop: the ids drawn and the CPU us a generated token
    spent in the step, in take (sampling and streaming), in streaming alone, in the loop."""
    decoder = gen.decoder()
    reply = Reply(request, gen.tokenizer, gen.context, decoder.new_cache())
    clock = time.thread_time_ns
    spent = [0, 0, 0, 0]
    push = reply.streamer.push

    def timed_push(token_id: int) -> str:  # the streamer's share of take, timed where it runs
        began = clock()
        text = push(token_id)
        spent[2] += clock() - began
        return text

    reply.streamer.push = timed_push
    while not reply.done:
        t0 = clock()
        feed = reply.feed()
        t1 = clock()
        logits = decoder.step(feed.ids, feed.cache)
        t2 = clock()
        reply.take(logits)
        t3 = clock()
        if len(feed.ids) == 1:  # a generating step (the prompt's steps are left out)
            spent[0] += t2 - t1
            spent[1] += t3 - t2
            spent[3] += t1 - t0
    ids = reply.loop.visible[len(request.ids):]
    return ids, [t / 1e3 / max(1, len(ids) - 1) for t in spent]


def _step_profile(gen: ResponseGenerator, request: PreparedRequest) -> dict[str, float]:
    """One reply under torch.profiler: us per token of each kind of op in the decode steps."""
    decoder = gen.decoder()
    reply = Reply(request, gen.tokenizer, gen.context, decoder.new_cache())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while not reply.done:
            feed = reply.feed()
            with record_function(STEP_LABEL):
                logits = decoder.step(feed.ids, feed.cache)
            reply.take(logits)
    tokens = max(1, reply.loop.produced)
    kinds: dict[str, float] = {}
    step_total = 0.0
    for event in prof.events():
        if event.name == STEP_LABEL:
            step_total += event.cpu_time_total
        elif event.name.startswith("aten::") and _inside(event, STEP_LABEL):
            kind = op_kind(event.name)
            kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total
    out = {kind: us / tokens for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])}
    out["Python and dispatch (the rest of the step)"] = max(0.0, step_total - sum(kinds.values())) / tokens
    out["profiled step"] = step_total / tokens
    return out


def _inside(event, label: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == label:
            return True
        parent = parent.cpu_parent
    return False


def token_cost(gen: ResponseGenerator, prompt: str, cfg: GenerationConfig, replies: int = 5) -> dict:
    """What one generated token costs on ``gen``'s model (CPU us, medians over ``replies``
    replies after a warm-up) and, from a profiled reply, the decode step by kind of op."""
    request = gen.prompts.complete(prompt, cfg)
    _timed_reply(gen, request)  # warm-up
    runs = [_timed_reply(gen, request) for _ in range(replies)]
    step, take, streaming, loop = (statistics.median(parts[i] for _, parts in runs) for i in range(4))
    return {"tokens": len(runs[0][0]), "threads": torch.get_num_threads(), "step_us": step,
            "sampling_us": max(0.0, take - streaming), "streaming_us": streaming, "loop_us": loop,
            "token_us": step + take + loop, "step_by_kind": _step_profile(gen, request)}
