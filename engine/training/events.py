"""What training reports while it runs, and what a training call returns.

The trainer reports progress as events, one small frozen dataclass per kind, to a
listener (``OnEvent``); the console and the torchrun log each format them their way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from engine.folder.records import EvalResult
from engine.training.runs import StopReason


@dataclass(frozen=True)
class VocabGrowth:
    """What growing the vocabulary did (``added == 0``: nothing was frequent enough)."""

    added: int
    examples: list[str]
    old_vocab: int
    new_vocab: int
    tokens_per_byte_before: float = 0.0
    tokens_per_byte_after: float = 0.0
    drift: float = 0.0  # share of earlier held-out text that now tokenizes differently


@dataclass(frozen=True)
class Notice:
    """Something the user should know now, in one line (e.g. a lowered vocabulary)."""

    text: str


@dataclass(frozen=True)
class TokenizerTraining:
    kind: str
    vocab_size: int  # the size asked of the tokenizer trainer


@dataclass(frozen=True)
class VocabGrowing:
    kind: str
    max_new: int


@dataclass(frozen=True)
class Tokenizing:
    source: str
    n_bytes: int


@dataclass(frozen=True)
class RunResumed:
    name: str
    epoch: int
    epochs: int
    run_step: int
    total_steps: int


@dataclass(frozen=True)
class RunStarted:
    resumed: bool
    params: int
    train_tokens: int
    device: str
    precision: str
    epochs: int
    batch_size: int
    window: int
    micro_batches: int
    world_size: int = 1  # processes sharing each batch (batch_size is their total)
    minutes_left: float = 0.0  # a time-budget run: what is left of it (its epochs are then open-ended)


@dataclass(frozen=True)
class EpochStarted:
    epoch: int  # 0-based
    epochs: int  # 0: open-ended (a time budget ends the run)
    n_batches: int
    batch: int  # where the epoch starts (later than 0 on resume)


@dataclass(frozen=True)
class StepDone:
    step: int
    loss: float
    lr: float
    tokens_per_s: float
    batch: int
    n_batches: int


@dataclass(frozen=True)
class Checkpointed:
    step: int


@dataclass(frozen=True)
class CompileChecked:
    ok: bool
    note: str


@dataclass(frozen=True)
class CompileFailed:
    reason: str


@dataclass(frozen=True)
class MemoryBackoff:
    micro_batches: int
    micro_batch_size: int
    batch_size: int


@dataclass(frozen=True)
class Evaluated:
    result: EvalResult


@dataclass(frozen=True)
class EpochEnded:
    epoch: int
    epochs: int


@dataclass(frozen=True)
class RunEnded:
    stopped: StopReason
    step: int


TrainingEvent = (Notice | TokenizerTraining | VocabGrowing | Tokenizing | RunResumed | RunStarted | EpochStarted
                 | StepDone | Checkpointed | CompileChecked | CompileFailed | MemoryBackoff | Evaluated
                 | EpochEnded | RunEnded)


OnEvent = Callable[[TrainingEvent], None]


def ignore_events(event: TrainingEvent) -> None:
    """The default listener: training reports to no one."""


@dataclass
class TrainResult:
    """What one training call did."""

    steps: int  # optimizer steps taken in this call
    global_step: int
    stopped_early: StopReason  # FINISHED ("", false) when the run finished; else why it stopped
    final_eval: EvalResult | None
    resumed: bool


@dataclass
class DatasetComparison:
    name: str
    before: EvalResult | None  # None: the data set is new
    after: EvalResult


@dataclass
class ContinualReport:
    """Teaching the model new material: the vocabulary growth, the run, before/after."""

    growth: VocabGrowth | None
    result: TrainResult
    table: list[DatasetComparison] = field(default_factory=list)
