"""Time-budget mode: the model shape and settings that learn the most in N minutes here.

The user says how long they can train; this module turns that into a model. It
measures what this machine computes (a few training steps of a reference model,
``probe_flop_rate``), predicts the tokens each candidate shape would see in the
budget, and picks by rules set from measurements (README, "Time budget", has the
runs and says what is not yet swept):

* Size: the largest shape on the ladder that still sees ``TOKENS_PER_PARAM`` training
  tokens per parameter of its blocks in the time. Less than that and a bigger model
  ends the budget further from converged than a smaller one that saw more text.
* Regularisation follows how often the data repeats: dropout 0 while the text is
  seen about once, more as the passes over it pile up (small data overfits).
* Learning rate: 1e-3 at width 256, scaled by 1/sqrt(width) (wider layers need
  smaller steps), never above 2e-3.

All of it is a plan (``BudgetPlan``): the Trainer builds the model it names and fits
the learning-rate schedule to the clock, and the user is shown the plan before the
first step.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass

import torch

from engine.model.config import ModelConfig
from engine.model.gpt import GPT
from engine.runtime import hardware
from engine.training.step import is_out_of_memory, release_memory, train_step

logger = logging.getLogger(__name__)

# (d_model, n_layer, n_head), smallest first; heads of 64 dimensions (32 for the two smallest).
LADDER = [
    (128, 2, 4),
    (128, 4, 4),
    (192, 4, 6),
    (256, 4, 4),
    (256, 6, 4),
    (384, 6, 6),
    (512, 8, 8),
    (768, 8, 12),
    (768, 12, 12),
    (1024, 12, 16),
    (1024, 24, 16),
]
# Training tokens per block parameter the chosen shape must reach. The sweep in the README
# brackets it: shapes that got 0.05-0.07 lost to the next smaller one (384x6 at 10 min,
# 512x8 at 30), shapes at 0.17-0.34 won or tied; 0.13 sits in the middle of that bracket
# (0.2 itself let a slow probe pick d192x4 at 3 min, which lost 0.02 bits/byte to d256x4).
TOKENS_PER_PARAM = 0.13
PROBE_SHAPE = (256, 4, 4)  # the reference model the probe times (the compact preset)
PROBE_SECONDS = 3.0  # at least this long, after one untimed warm-up step


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layer: int
    n_head: int
    context: int = 256

    @property
    def block_params(self) -> int:
        """Parameters of the transformer blocks (attention and MLP matrices), not the embeddings."""
        return 12 * self.n_layer * self.d_model ** 2

    def flops_per_token(self, vocab_size: int) -> float:
        """Training FLOPs per token: 6 per weight touched (forward and backward), the
        output head included, plus causal attention over the context (on average half)."""
        weights = self.block_params + self.d_model * vocab_size
        attention = 2 * self.n_layer * self.context * self.d_model  # q.k and att.v, forward, causal half
        return 6 * weights + 3 * attention


@dataclass(frozen=True)
class BudgetPlan:
    minutes: float
    shape: Shape
    batch_size: int
    learning_rate: float
    dropout: float
    flop_rate: float  # what the probe measured (FLOP/s of training)
    tokens_per_s: float  # predicted for this shape
    planned_tokens: int  # what the budget buys at that rate
    data_tokens: int  # training tokens in the data

    @property
    def passes(self) -> float:
        return self.planned_tokens / max(1, self.data_tokens)

    def describe(self) -> str:
        s = self.shape
        return (f"time budget {self.minutes:g} min: this machine trains at {self.flop_rate / 1e9:,.3g} GFLOP/s, so "
                f"d_model {s.d_model}, {s.n_layer} layers, {s.n_head} heads, context {s.context}, batch "
                f"{self.batch_size}, learning rate {self.learning_rate:.2g}, dropout {self.dropout:g}: about "
                f"{self.tokens_per_s:,.0f} tokens/s, {self.planned_tokens:,} tokens, "
                f"{self.passes:.1f} passes over the {self.data_tokens:,} tokens of text")


def learning_rate_for(d_model: int) -> float:
    return min(2e-3, 1e-3 * math.sqrt(256 / d_model))


def dropout_for(passes: float) -> float:
    """More dropout the more often the text repeats: a model that reads the same text many
    times overfits it. The step to 0.2 lies between two runs in the README: at 8.1 planned
    passes (3 min on an 82,000-token text) 0.2 lost 0.017 bits/byte to 0.1; at 9 (30 min
    on tinyshakespeare, d384 x 6) 0.2 reached 2.120 and 0.1 2.134."""
    if passes <= 1.5:
        return 0.0
    if passes <= 8.5:
        return 0.1
    return 0.2


def probe_seconds(minutes: float) -> float:
    """How long to probe: ``PROBE_SECONDS``, but at most 2% of a short budget (0.3 s at least)."""
    return min(PROBE_SECONDS, max(0.3, 0.02 * minutes * 60))


def probe_flop_rate(runtime: hardware.Runtime, vocab_size: int, batch_size: int, shape: Shape | None = None,
                    seconds: float | None = None) -> float:
    """Training FLOP/s of this machine: timed steps of ``shape`` on ``batch_size`` random sequences.

    The training step itself (``step.train_step``: forward, backward, clipping and the
    fused AdamW update), in the precision training will use. By default the reference
    shape: its rate carries over to the ladder's other shapes well enough on a CPU
    (their matrix products run at a similar share of peak from width 128 up), and the
    trainer re-plans from the real steps anyway.

    A batch that does not fit backs off as training does: the micro-batch is halved
    until a step fits (``MemoryError`` when one sequence does not), and the rate is that
    of the step training will then run.
    """
    shape = shape or Shape(*PROBE_SHAPE)
    seconds = PROBE_SECONDS if seconds is None else seconds
    generator = torch.Generator().manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, context=shape.context, d_model=shape.d_model, n_layer=shape.n_layer,
                         n_head=shape.n_head)
    try:
        model = GPT(config).to(runtime.device)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise MemoryError(f"a model of d_model {shape.d_model} x {shape.n_layer} layers does not fit in the memory "
                          f"of {runtime.device}; choose a smaller --preset or sizes") from None
    fused = {"fused": True} if runtime.device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    x = torch.randint(0, vocab_size, (batch_size, shape.context), generator=generator).to(runtime.device)
    steps = ProbeSteps(model, optimizer, x, runtime)
    steps.run()  # warm-up: first-call allocations and kernel choices (and the back-off, if any)
    durations: list[float] = []
    start = time.perf_counter()
    while len(durations) < 3 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        steps.run()
        durations.append(time.perf_counter() - began)
    del model, optimizer, steps
    release_memory(runtime)  # the probe's model is not the one that trains
    # The median step, not the mean: the second step is often still slow (the allocator
    # grows to its peak), and one step that another program delayed should not size the model.
    return batch_size * shape.context * shape.flops_per_token(vocab_size) / statistics.median(durations)


class ProbeSteps:
    """The probe's training step on one batch, in as many micro-batches as fit in memory."""

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 runtime: hardware.Runtime) -> None:
        self.model, self.optimizer, self.x, self.runtime = model, optimizer, x, runtime
        self.micro_batches = 1

    def run(self) -> None:
        """One step, retried with twice the micro-batches after running out of memory."""
        rows = self.x.shape[0]
        while True:
            try:
                train_step(self.model, self.optimizer, self.x, self.x, 1e-4, self.runtime, grad_clip=1.0,
                           micro_batches=self.micro_batches)  # the loss is read: the step has finished
                return
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
            # Out of the except block: its traceback holds the failed pass's activations.
            self.optimizer.zero_grad(set_to_none=True)
            release_memory(self.runtime)
            if self.micro_batches >= rows:
                raise MemoryError(f"out of memory on {self.runtime.device} even with one sequence per micro-batch "
                                  "while measuring this machine's speed; choose a smaller model or context")
            self.micro_batches = min(2 * self.micro_batches, rows)
            logger.info("the probe ran out of memory: %d micro-batches of %d sequences", self.micro_batches,
                        -(-rows // self.micro_batches))


def plan_budget(minutes: float, flop_rate: float, data_tokens: int, vocab_size: int, batch_size: int,
                context: int = 256, pinned: Shape | None = None) -> BudgetPlan:
    """The shape, learning rate and dropout for ``minutes`` of training at ``flop_rate``.

    ``pinned`` keeps a shape the user chose (a preset or explicit sizes); the rest
    (learning rate, dropout) is still planned for it.
    """
    if not minutes > 0:
        raise ValueError(f"the time budget must be a positive number of minutes (got {minutes!r})")
    seconds = minutes * 60

    def tokens_for(shape: Shape) -> int:
        return int(flop_rate * seconds / shape.flops_per_token(vocab_size))

    if pinned is not None:
        shape = pinned
    else:
        candidates = [Shape(d, n_layer, n_head, context) for d, n_layer, n_head in LADDER]
        fitting = [s for s in candidates if tokens_for(s) >= TOKENS_PER_PARAM * s.block_params]
        shape = fitting[-1] if fitting else candidates[0]
    tokens = tokens_for(shape)
    return BudgetPlan(minutes=minutes, shape=shape, batch_size=batch_size,
                      learning_rate=learning_rate_for(shape.d_model),
                      dropout=dropout_for(tokens / max(1, data_tokens)), flop_rate=flop_rate,
                      tokens_per_s=flop_rate / shape.flops_per_token(vocab_size), planned_tokens=tokens,
                      data_tokens=data_tokens)
