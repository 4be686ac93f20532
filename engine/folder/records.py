"""The records a model folder keeps as JSON, and what is read back from it without loading a model.

Each is a small dataclass: fields have names both sides spell the same way because they
are attributes, not dict keys, so a renamed field fails loudly at its first use. What is
saved converts with ``to_dict``/``from_dict``; ``from_dict`` ignores nothing silently
except keys an older save is known to carry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


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
