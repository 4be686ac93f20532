"""Typed values that travel between rooms: results, records and training events.

The trainer reports progress as events (one small frozen dataclass per kind), the
model folder reads back records and a status, and the menu formats them. Fields
have names both sides spell the same way because they are attributes, not dict
keys: a renamed field fails loudly at the first use.

What is saved as JSON (history, datasets) converts with ``to_dict``/``from_dict``;
``from_dict`` ignores nothing silently except keys an older save is known to carry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable

# What a user can cause (a bad path, a full disk, a diverging loss): every door shows these
# as one line and carries on or exits; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError, MemoryError)


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class EvalResult:
    """Loss on held-out text: nats per token, perplexity and bits per byte.

    Bits per byte divide the total loss by the bytes of text the targets stand for,
    which puts models with different tokenizers on one scale.
    """

    val_loss: float
    perplexity: float
    bpb: float
    val_tokens: int
    step: int = 0
    epoch: int = 0
    dataset: str = ""
    partial_epoch: bool = False  # evaluated when a run stopped inside an epoch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        return cls(**_known(cls, d))


@dataclass
class DatasetRecord:
    """One data set the model has trained on, as ``datasets.json`` lists it."""

    id: str  # the first part of its token-cache name (a content hash)
    name: str
    file: str  # held-out text and rehearsal sample, relative to the model folder
    added: str
    latest: EvalResult | None = None
    kind: str = "text"  # "chat": conversations, judged on the assistant's replies

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "file": self.file, "added": self.added, "kind": self.kind,
                "latest": self.latest.to_dict() if self.latest else None}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetRecord:
        latest = d.get("latest")
        return cls(id=d["id"], name=d["name"], file=d["file"], added=d.get("added", ""),
                   latest=EvalResult.from_dict(latest) if latest else None, kind=d.get("kind", "text"))


@dataclass(frozen=True)
class RunRecord:
    """A training run as ``history.json`` lists it."""

    name: str
    start_step: int
    epochs: int
    tokens: int
    kind: str = "text"  # "chat": fine-tuning on conversations
    minutes: float = 0.0  # a time-budget run's budget (its epochs are then only an upper bound)


@dataclass
class FolderStatus:
    """What the Training Status screen shows; read from the folder, nothing loaded."""

    tokenizer: str
    model: dict  # the saved model config
    steps: int
    tokens_seen: int
    epochs: int
    last_eval: EvalResult | None
    best_val_loss: float | None
    losses: list[float]
    runs: list[RunRecord]
    datasets: list[DatasetRecord]
    chat_tuned: bool = False  # fine-tuned on conversations: Chat uses the learned format

    @property
    def stage(self) -> str:
        return "chat-tuned" if self.chat_tuned else "text only"


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


# -- training events ---------------------------------------------------------------------

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
    stopped: str  # "" when the run finished
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
    stopped_early: str  # "" when the run finished; else why it stopped
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


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: the format, where, its files and size, and notes for the user."""

    format: str  # "hf" or "gguf"
    path: str
    files: list[str]
    n_bytes: int
    chat_template: bool  # the model has a chat format and the export carries its template
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelSummary:
    """A model's size and progress, read from its config without loading the weights."""

    parameters: int
    tokenizer: str
    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    context: int
    training_steps: int
    chat_tuned: bool
