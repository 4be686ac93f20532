"""Held-out evaluation: loss, perplexity and bits per byte, alone or summed over the ranks.

``estimate_loss`` is the pure measure (it restores train mode); ``evaluate_run`` is what
a run evaluates at the end of a pass, split over the ranks of a distributed run;
``evaluate_held_out`` measures every data set the model has trained on, which is what
continual learning compares before and after.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable

import numpy as np
import torch

from engine.data.chat_windows import ChatDataset
from engine.data.tokenizer import BaseTokenizer
from engine.data.windows import TokenDataset, encode_documents, iter_windows
from engine.folder.records import EvalResult
from engine.model.gpt import GPT
from engine.runtime import hardware
from engine.runtime.distributed import Distributed
from engine.training.dataset_memory import DatasetMemory
from engine.training.runs import RunState

HELD_OUT_BATCH = 8  # sequences per batch when measuring every data set the model has seen


def estimate_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, ...]], runtime: hardware.Runtime,
                  token_bytes: np.ndarray) -> EvalResult:
    """Validation loss (nats/token), perplexity and bits per byte; restores train mode.

    Bits per byte divide the total loss by the bytes of text the targets stand for,
    which makes models with different tokenizers comparable. Targets of -1 are not
    counted (in conversations, everything but the assistant's replies).
    """
    return eval_result(*validation_sums(model, batches, runtime, token_bytes))


def eval_result(total_nats: float, total_tokens: int, total_bytes: int) -> EvalResult:
    """The validation numbers from the sums ``validation_sums`` returns (added up over ranks)."""
    loss = total_nats / max(1, total_tokens)
    return EvalResult(val_loss=loss, perplexity=math.exp(min(loss, 50.0)),
                      bpb=total_nats / math.log(2) / max(1, total_bytes), val_tokens=total_tokens)


@torch.no_grad()
def validation_sums(model: GPT, batches: Iterable[tuple[torch.Tensor, ...]], runtime: hardware.Runtime,
                    token_bytes: np.ndarray) -> tuple[float, int, int]:
    """(nats, learned targets, bytes they stand for) summed over ``batches``; restores train mode."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    token_bytes_t = torch.from_numpy(token_bytes)
    try:
        for x, y, *segments in batches:  # conversations come with segments (see GPT.forward)
            segments = segments[0].to(runtime.device) if segments else None
            with runtime.autocast():
                logits, _ = model(x.to(runtime.device), segments=segments)
            nats = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                     y.to(runtime.device).reshape(-1), reduction="sum", ignore_index=-1)
            learned = y >= 0  # conversations learn only the assistant's ids; the rest is -1
            total_nats += nats.item()
            total_tokens += int(learned.sum())
            total_bytes += int(token_bytes_t[y[learned]].sum())
    finally:
        model.train(was_training)
    return total_nats, total_tokens, total_bytes


def evaluate_run(model: GPT, dataset: TokenDataset | ChatDataset, token_bytes: np.ndarray, run: RunState,
                 eval_batches: int, runtime: hardware.Runtime, dist: Distributed | None = None) -> EvalResult:
    """The held-out result of ``run``'s data, as the run's end-of-pass evaluation measures it.

    After an out-of-memory back-off it evaluates in micro-batches too: the same windows.
    A distributed run evaluates those windows too, each rank a share of the batches, and
    adds up the sums: the result is the one process's, reached W times faster.
    """
    micro, world_size = run.micro_batches, run.world_size
    batches = dataset.val_batches(-(-(run.batch_size // world_size) // micro), eval_batches * micro * world_size)
    if dist is None:
        return estimate_loss(model, batches, runtime, token_bytes)
    mine = itertools.islice(batches, dist.rank, None, world_size)
    sums = torch.tensor(validation_sums(model, mine, runtime, token_bytes), dtype=torch.float64, device=runtime.device)
    total_nats, total_tokens, total_bytes = dist.all_reduce_sum(sums).tolist()
    return eval_result(total_nats, int(total_tokens), int(total_bytes))


def evaluate_held_out(model: GPT, tokenizer: BaseTokenizer, memory: DatasetMemory, runtime: hardware.Runtime,
                      eval_batches: int) -> dict[str, EvalResult]:
    """Validation results on the held-out text of every data set seen, by name."""
    token_bytes = tokenizer.token_bytes()
    results = {}
    for record, docs in memory.held_out_texts():
        tokens = encode_documents(tokenizer, docs)
        if len(tokens) < 2:
            continue
        batches = iter_windows(tokens, model.config.context, HELD_OUT_BATCH, eval_batches)
        results[record.name] = estimate_loss(model, batches, runtime, token_bytes)
    chat_ids = tokenizer.chat_token_ids()
    for record, conversations in memory.held_out_conversations():
        held_out = ChatDataset.build(tokenizer, chat_ids, [], conversations, model.config.context)
        batches = held_out.val_batches(HELD_OUT_BATCH, eval_batches)
        results[record.name] = estimate_loss(model, batches, runtime, token_bytes)
    return results
