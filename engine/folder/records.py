"""The records a model folder keeps as JSON, and what is read back from it without loading a model.

Each is a small dataclass: fields have names both sides spell the same way because they
are attributes, not dict keys, so a renamed field fails loudly at its first use. What is
saved converts with ``to_dict``/``from_dict``, and ``to_dict`` writes the JSON the
folder has always held (``history.json``'s step rows stay ``[step, loss, lr]`` lists).
``from_dict`` reads the fields it knows (a field an older save lacks takes its default)
and passes over keys it does not, so a save from a newer version still opens;
``FolderMeta`` keeps config.json's unknown keys and writes them back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from engine.data.chat_format import Message
from engine.model.config import ModelConfig


class TextEnum(str, Enum):
    """An enum whose members are their text: equal to it, hashed, printed and saved as it
    (``enum.StrEnum`` does this from Python 3.11; this program supports 3.10)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class RunKind(TextEnum):
    """What a run trains on; saved as its text."""

    TEXT = "text"
    CHAT = "chat"  # conversations: only the assistant's replies are learned


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
    kind: RunKind = RunKind.TEXT  # chat: conversations, judged on the assistant's replies

    def __post_init__(self) -> None:
        self.kind = RunKind(self.kind)  # "text"/"chat" from a caller become the enum

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "file": self.file, "added": self.added, "kind": self.kind.value,
                "latest": self.latest.to_dict() if self.latest else None}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetRecord:
        latest = d.get("latest")
        return cls(id=d["id"], name=d["name"], file=d["file"], added=d.get("added", ""),
                   latest=EvalResult.from_dict(latest) if latest else None, kind=d.get("kind", "text"))


@dataclass
class DatasetTexts:
    """What a data set leaves in ``datasets/<id>.json`` (``DatasetRecord.file``): raw text, so that
    it outlives a tokenizer that grows.

    A text data set keeps held-out documents (``val``) and a rehearsal sample of its training
    part; a conversation set keeps its held-out ``conversations`` instead (and the two lists
    empty). ``conversations`` is None for a text data set, whose file has no such key.
    """

    name: str = ""
    val: list[str] = field(default_factory=list)
    rehearsal: list[str] = field(default_factory=list)
    conversations: list[list[Message]] | None = None

    def to_dict(self) -> dict:
        saved: dict[str, Any] = {"name": self.name, "val": self.val, "rehearsal": self.rehearsal}
        if self.conversations is not None:
            saved["conversations"] = [[m.to_dict() for m in conv] for conv in self.conversations]
        return saved

    @classmethod
    def from_dict(cls, d: dict) -> DatasetTexts:
        saved = d.get("conversations")
        conversations = None if saved is None else [[Message(m["role"], m["content"]) for m in conv]
                                                    for conv in saved]
        return cls(name=d.get("name", ""), val=d.get("val", []), rehearsal=d.get("rehearsal", []),
                   conversations=conversations)


@dataclass(frozen=True)
class RunRecord:
    """A training run as ``history.json`` lists it."""

    name: str
    start_step: int
    epochs: int
    tokens: int
    kind: RunKind = RunKind.TEXT
    minutes: float = 0.0  # a time-budget run's budget (its epochs are then only an upper bound)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", RunKind(self.kind))  # "text"/"chat" from a caller become the enum

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as ``history.json`` keeps it: a ``[step, loss, lr]`` row."""

    step: int  # the model's global step after it
    loss: float  # the batch's mean loss, rounded to 5 decimals
    lr: float

    def to_row(self) -> list:
        return [self.step, self.loss, self.lr]

    @classmethod
    def from_row(cls, row: list) -> StepRecord:
        step, loss, lr = row
        return cls(step, loss, lr)


@dataclass(frozen=True)
class VocabExpansion:
    """A growth of the vocabulary, as ``history.json`` lists it."""

    step: int
    added: int
    new_vocab: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VocabExpansion:
        return cls(**_known(cls, d))


@dataclass
class History:
    """``history.json``: every step's loss and learning rate, every validation, every run
    and every growth of the vocabulary, in the order they happened."""

    steps: list[StepRecord] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    expansions: list[VocabExpansion] = field(default_factory=list)

    def to_dict(self) -> dict:
        saved: dict[str, Any] = {"steps": [s.to_row() for s in self.steps],
                                 "evals": [e.to_dict() for e in self.evals],
                                 "runs": [r.to_dict() for r in self.runs]}
        if self.expansions:  # the key appears with the first growth, as it always has
            saved["expansions"] = [e.to_dict() for e in self.expansions]
        return saved

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(steps=[StepRecord.from_row(row) for row in d.get("steps", [])],
                   evals=[EvalResult.from_dict(e) for e in d.get("evals", [])],
                   runs=[RunRecord.from_dict(r) for r in d.get("runs", [])],
                   expansions=[VocabExpansion.from_dict(e) for e in d.get("expansions", [])])

    def drop_after(self, step: int) -> None:
        """Forget the steps and evaluations logged after ``step`` (lost with a crashed process)."""
        self.steps = [s for s in self.steps if s.step <= step]
        self.evals = [e for e in self.evals if e.step <= step]


@dataclass
class SavedProgress:
    """The model's counters over its whole life, as ``config.json`` shows them.

    Training's ``Progress`` is these counters and the run in progress (training's
    ``RunState``, which this package, below training, does not know); the checkpoint
    holds all of it, config.json the counters alone.
    """

    step: int = 0
    tokens_seen: int = 0
    epochs_done: int = 0

    def to_dict(self) -> dict:
        """config.json's ``progress``: the counters, named one by one (``Progress`` adds its run to them)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "epochs_done": self.epochs_done}

    @classmethod
    def from_dict(cls, d: dict) -> SavedProgress:
        return cls(**_known(cls, d))


def _upgrade_meta(meta: dict) -> dict:
    """Read older formats as today's.

    Format 1 called the context ``max_seq_len`` and the requested vocabulary
    ``vocab_size``. A folder saved before the block design and the optimizer were
    settings holds a GPT-2 block trained with AdamW: it says so explicitly from now on,
    whatever the defaults for new models become.
    """
    meta = dict(meta)
    model = meta.get("model")
    if isinstance(model, dict):
        model = dict(model)
        if "max_seq_len" in model:
            model["context"] = model.pop("max_seq_len")
        model.setdefault("arch", "gpt2")
        meta["model"] = model
    training = meta.get("training")
    if isinstance(training, dict):
        training = dict(training)
        if "vocab_size" in training:
            training["target_vocab_size"] = training.pop("vocab_size")
        training.setdefault("optimizer", "adamw")
        meta["training"] = training
    return meta


@dataclass
class FolderMeta:
    """``config.json``: the tokenizer kind, the model's shape, the training settings and progress.

    ``training`` stays the dict of ``TrainConfig.to_dict()``: the training settings are
    the training package's to read, and this package sits below it. Keys this version
    does not know (a folder touched by another version) are kept in ``extra`` and
    written back unchanged. ``format_version`` is added by ``ModelFolder.commit_save``.
    """

    tokenizer: str
    model: ModelConfig
    training: dict = field(default_factory=dict)
    created: str = ""
    progress: SavedProgress = field(default_factory=SavedProgress)
    chat_tuned: bool = False  # fine-tuned on conversations: Chat uses the learned format
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        saved: dict[str, Any] = {"tokenizer": self.tokenizer, "model": self.model.to_dict(),
                                 "training": dict(self.training)}
        if self.created:
            saved["created"] = self.created
        saved["progress"] = self.progress.to_dict()
        if self.chat_tuned:  # absent until a chat fine-tune, as before
            saved["chat_tuned"] = True
        return {**saved, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> FolderMeta:
        """Read a ``config.json`` object of any format, upgraded in memory; the model config
        is validated here, before any tensor is allocated."""
        d = _upgrade_meta(d)
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in known and k != "format_version"}
        training = d.get("training") or {}
        if not isinstance(training, dict):
            raise ValueError("the training settings in config.json must be a JSON object")
        return cls(tokenizer=str(d.get("tokenizer", "")), model=ModelConfig.from_dict(d.get("model")),
                   training=training, created=str(d.get("created", "")),
                   progress=SavedProgress.from_dict(d.get("progress") or {}),
                   chat_tuned=bool(d.get("chat_tuned")), extra=extra)


@dataclass
class FolderStatus:
    """What the Training Status screen shows; read from the folder, nothing loaded."""

    tokenizer: str
    model: ModelConfig
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
