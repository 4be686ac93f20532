"""Time-budget mode: the model shape and settings that learn the most in N minutes here.

The user says how long they can train; this module turns that into a model. It
measures what this machine computes (a few training steps of a reference shape built
with the run's block design, optimizer, context and precision, ``probe_flop_rate``),
predicts the tokens each candidate shape would see in the budget, and picks by rules
set from measurements (README, "Time budget", has the runs and says what is not yet
swept):

* Size: the largest shape on the ladder that still sees ``TOKENS_PER_PARAM`` training
  tokens per parameter of its blocks in the time. Less than that and a bigger model
  ends the budget further from converged than a smaller one that saw more text.
* Regularisation follows how often the data repeats: dropout 0 while the text is
  seen about once, more as the passes over it pile up (small data overfits).
* Learning rate: the new-model recipe's (``config.NEW_MODEL_RECIPE``) at width 256,
  scaled by 1/sqrt(width) (wider layers need smaller steps), never above twice it.
* Vocabulary (``plan_vocabulary``), for a new tokenizer whose size the user left open:
  the largest candidate whose embedding stays within ``EMBED_SHARE`` of the shape's
  block parameters, so that a small model does not spend a third of itself on
  embedding rows a small text hardly trains.

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
from engine.training.checkpoint import TrainingState
from engine.training.config import TrainConfig
from engine.training.step import backing_off, is_out_of_memory, release_memory, train_step

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
PROBE_LR = 1e-4  # the probe's steps on random tokens: small, so no step can overflow; speed does not depend on it
# The most of the blocks' parameters (12 x n_layer x d_model^2) a planned vocabulary's
# embedding (V x d_model) may take. A first value, to be fitted by the budget sweep
# (scripts/budget_experiment.py --vocab-sizes): with 1/3 the ladder's d128 x 2 gets 1,024
# tokens, d256 x 4 4,096 and from d384 x 6 on the 8,000 asked for by default.
EMBED_SHARE = 1 / 3
MIN_PLANNED_VOCAB = 1024  # the smallest candidate: below it BPE hardly merges more than common pairs


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

    def embedding_fits(self, vocab_size: int) -> bool:
        """Whether a vocabulary's embedding (V x d_model) is at most ``EMBED_SHARE`` of the block parameters."""
        return vocab_size * self.d_model <= EMBED_SHARE * self.block_params


@dataclass(frozen=True)
class VocabularyChoice:
    """The size a new model's tokenizer is trained to under a time budget, and why."""

    size: int
    requested: int  # TrainConfig.target_vocab_size: the user's, or the default
    ceiling: int  # ``requested``, lowered for a small text (``supported_vocab_size``)
    pinned: bool  # the user gave the size: it is kept, and the embedding rule does not apply

    def reason(self) -> str:
        """A few words for the plan's description."""
        limit = "asked for" if self.ceiling == self.requested else f"the text supports, of {self.requested:,} asked"
        if self.pinned:
            return "as asked" if self.ceiling == self.requested else f"the most {limit}"
        if self.size < self.ceiling:
            return f"its embedding within {EMBED_SHARE:.0%} of the block weights; up to {self.ceiling:,} {limit}"
        return f"the most {limit}"


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
    vocab_size: int  # the vocabulary planned with (the tokenizer's)
    vocabulary: VocabularyChoice | None = None  # how it was chosen, when the plan chose it

    @property
    def passes(self) -> float:
        return self.planned_tokens / max(1, self.data_tokens)

    def describe(self) -> str:
        s = self.shape
        why = f" ({self.vocabulary.reason()})" if self.vocabulary else ""
        return (f"time budget {self.minutes:g} min: this machine trains at {self.flop_rate / 1e9:,.3g} GFLOP/s, so "
                f"d_model {s.d_model}, {s.n_layer} layers, {s.n_head} heads, context {s.context}, vocabulary "
                f"{self.vocab_size:,}{why}, batch {self.batch_size}, learning rate {self.learning_rate:.2g}, "
                f"dropout {self.dropout:g}: about {self.tokens_per_s:,.0f} tokens/s, {self.planned_tokens:,} "
                f"tokens, {self.passes:.1f} passes over the {self.data_tokens:,} tokens of text")


def learning_rate_for(d_model: int, base: float = 1e-3) -> float:
    """``base`` at width 256, scaled by 1/sqrt(width / 256), never above twice ``base``."""
    return min(2 * base, base * math.sqrt(256 / d_model))


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


def probe_flop_rate(runtime: hardware.Runtime, model: ModelConfig, batch_size: int,
                    config: TrainConfig | None = None, seconds: float | None = None) -> float:
    """Training FLOP/s of this machine: timed steps of ``model`` on ``batch_size`` random sequences.

    The step the run will take: the network ``model`` describes (its block design and
    QK-norm, width, depth, context and vocabulary), with the optimizer ``config`` names,
    both built as a new run builds them (``TrainingState.fresh``: ``make_optimizer``, and
    fp16's gradient scaler), stepped by ``step.train_step`` in ``runtime``'s precision.
    So llama's SwiGLU, RMSNorm and rotary positions, and Muon's Newton-Schulz iterations,
    are in the time. The planner passes the reference shape (``PROBE_SHAPE``) or the one
    the user pinned: the rate carries over to the ladder's other shapes well enough on a
    CPU (their matrix products run at a similar share of peak from width 128 up), and the
    trainer re-plans from the real steps anyway, as it does for ``TrainConfig.compile``,
    which the probe leaves out (compiling alone would take longer than the probe).

    A batch that does not fit backs off as training does: the micro-batch is halved
    until a step fits (``MemoryError`` when one sequence does not), and the rate is that
    of the step training will then run.
    """
    config = config or TrainConfig()
    seconds = PROBE_SECONDS if seconds is None else seconds
    generator = torch.Generator().manual_seed(0)
    try:
        state = TrainingState.fresh(GPT(model).to(runtime.device), config, runtime)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise MemoryError(f"a model of d_model {model.d_model} x {model.n_layer} layers does not fit in the memory "
                          f"of {runtime.device}; choose a smaller --preset or sizes") from None
    x = torch.randint(0, model.vocab_size, (batch_size, model.context), generator=generator).to(runtime.device)
    steps = ProbeSteps(state, x, runtime, config.grad_clip)
    steps.run()  # warm-up: first-call allocations and kernel choices (and the back-off, if any)
    durations: list[float] = []
    start = time.perf_counter()
    while len(durations) < 3 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        steps.run()
        durations.append(time.perf_counter() - began)
    del state, steps
    release_memory(runtime)  # the probe's model is not the one that trains
    # The median step, not the mean: the second step is often still slow (the allocator
    # grows to its peak), and one step that another program delayed should not size the model.
    shape = Shape(model.d_model, model.n_layer, model.n_head, model.context)
    return batch_size * model.context * shape.flops_per_token(model.vocab_size) / statistics.median(durations)


class ProbeSteps:
    """The probe's training step on one batch, in as many micro-batches as fit in memory."""

    def __init__(self, state: TrainingState, x: torch.Tensor, runtime: hardware.Runtime, grad_clip: float) -> None:
        self.state, self.x, self.runtime, self.grad_clip = state, x, runtime, grad_clip
        self.micro_batches = 1

    def run(self) -> None:
        """One step, retried with twice the micro-batches after running out of memory (``backing_off``)."""
        rows, state = self.x.shape[0], self.state

        def attempt(micro_batches: int) -> float:  # the loss is read: the step has finished
            return train_step(state.model, state.optimizer, self.x, self.x, PROBE_LR, self.runtime, self.grad_clip,
                              state.scaler, micro_batches)

        def backed_off(micro_batches: int) -> None:
            logger.info("the probe ran out of memory: %d micro-batches of %d sequences", micro_batches,
                        -(-rows // micro_batches))

        _, self.micro_batches = backing_off(
            attempt, self.micro_batches, rows, state.optimizer, self.runtime,
            f"out of memory on {self.runtime.device} even with one sequence per micro-batch while measuring this "
            "machine's speed; choose a smaller model or context", backed_off)


def tokens_in(minutes: float, flop_rate: float, shape: Shape, vocab_size: int) -> int:
    """The training tokens ``minutes`` at ``flop_rate`` buy for ``shape`` with ``vocab_size``."""
    return int(flop_rate * (minutes * 60) / shape.flops_per_token(vocab_size))


def ladder_shape(minutes: float, flop_rate: float, vocab_size: int, context: int = 256) -> Shape:
    """The largest shape on the ladder that sees ``TOKENS_PER_PARAM`` tokens per block parameter; else the smallest."""
    candidates = [Shape(d, n_layer, n_head, context) for d, n_layer, n_head in LADDER]
    fitting = [s for s in candidates
               if tokens_in(minutes, flop_rate, s, vocab_size) >= TOKENS_PER_PARAM * s.block_params]
    return fitting[-1] if fitting else candidates[0]


def vocabulary_candidates(ceiling: int) -> list[int]:
    """The sizes a plan picks from: powers of two from ``MIN_PLANNED_VOCAB`` below ``ceiling``, and the ceiling.

    >>> vocabulary_candidates(8000)
    [1024, 2048, 4096, 8000]
    >>> vocabulary_candidates(600)
    [600]
    """
    sizes, size = [], MIN_PLANNED_VOCAB
    while size < ceiling:
        sizes.append(size)
        size *= 2
    return sizes + [ceiling]


def plan_vocabulary(minutes: float, flop_rate: float, ceiling: int, context: int = 256,
                    pinned: Shape | None = None) -> int:
    """The largest candidate vocabulary (``vocabulary_candidates``) whose embedding ``embedding_fits``
    the shape planned with it; the smallest candidate when none does.

    The shape depends on the vocabulary too (the output head's FLOPs per token), so the
    two are planned to a fixed point: from the ceiling, the shape the budget buys, the
    largest vocabulary that shape carries, the shape that vocabulary buys, and so on; a
    smaller vocabulary can only buy the same shape or a bigger one, and it settles in two
    or three rounds. Should it swing between two sizes (the bigger shape carries a vocabulary
    whose head makes the budget buy the smaller shape again), the smaller size is taken:
    it fits the bigger shape it buys. A ``pinned`` shape is planned with as it is.
    """
    candidates = vocabulary_candidates(ceiling)

    def largest_fitting(shape: Shape) -> int:
        fitting = [size for size in candidates if shape.embedding_fits(size)]
        return fitting[-1] if fitting else candidates[0]

    if pinned is not None:
        return largest_fitting(pinned)
    tried = [ceiling]
    while True:
        size = largest_fitting(ladder_shape(minutes, flop_rate, tried[-1], context))
        if size == tried[-1]:
            return size
        if size in tried:  # a cycle: the smallest size in it
            return min(tried[tried.index(size):])
        tried.append(size)


def plan_budget(minutes: float, flop_rate: float, data_tokens: int, vocab_size: int, batch_size: int,
                context: int = 256, pinned: Shape | None = None, base_learning_rate: float = 1e-3) -> BudgetPlan:
    """The shape, learning rate and dropout for ``minutes`` of training at ``flop_rate``.

    ``pinned`` keeps a shape the user chose (a preset or explicit sizes); the rest
    (learning rate, dropout) is still planned for it. ``base_learning_rate`` is the
    recipe's rate at width 256 (``learning_rate_for``).
    """
    if not minutes > 0:
        raise ValueError(f"the time budget must be a positive number of minutes (got {minutes!r})")
    shape = pinned if pinned is not None else ladder_shape(minutes, flop_rate, vocab_size, context)
    tokens = tokens_in(minutes, flop_rate, shape, vocab_size)
    return BudgetPlan(minutes=minutes, shape=shape, batch_size=batch_size,
                      learning_rate=learning_rate_for(shape.d_model, base_learning_rate),
                      dropout=dropout_for(tokens / max(1, data_tokens)), flop_rate=flop_rate,
                      tokens_per_s=flop_rate / shape.flops_per_token(vocab_size), planned_tokens=tokens,
                      data_tokens=data_tokens, vocab_size=vocab_size)
