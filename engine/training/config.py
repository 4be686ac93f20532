"""The training settings (``TrainConfig``), a new model's recipe, the learning-rate schedule, the limits on a call.

Saved in ``config.json`` as ``TrainConfig.to_dict()``; a run inherits the saved
settings unless the caller overrides them. ``lr_at`` is pure: the loop, the tests
and the benchmark all ask it for the same schedule.

``NEW_MODEL_RECIPE`` is what a new model gets unless the user says otherwise: the block
design (``arch``, ``qk_norm``), the optimizer and the peak learning rate. Only a new
model reads it: ``Trainer`` lays it under the user's training flags for an empty folder,
and ``Planner`` under the user's model flags when it builds a new ``ModelConfig`` (and
times the same recipe when it probes for a time budget). User flags always win.

Why a recipe rather than the defaults of ``ModelConfig`` and ``TrainConfig``: those
defaults say what a config.json without the key means, and every ``ModelConfig(...)``
a test, a benchmark or an export builds takes them. Kept at what old folders trained
with (gpt2, AdamW, 1e-3), they go on meaning one thing, while what a new model gets
changes in one place: the ``NEW_MODEL_RECIPE = Recipe(...)`` line below is the switch.
(``_upgrade_meta`` in ``engine.folder.records`` also writes gpt2/adamw into an old
folder's config explicitly, so the dataclass defaults could move later without harm.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from engine.data.conversations import DEFAULT_SEED
from engine.model.config import ARCHS

MAX_EPOCHS = 100_000
MAX_BUDGET_MINUTES = 7 * 24 * 60
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    # 1e-3 rather than GPT-2's 3e-4-6e-4: the compact model a CPU trains learns clearly
    # more per minute with it (bench.py --quality: 2.24 vs 2.29 bits/byte in 165 s).
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int = 100  # capped at a tenth of a run, so short runs still decay
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 0  # 0: chosen from the device
    val_fraction: float = 0.05
    checkpoint_every: int = 100
    eval_batches: int = 50
    target_vocab_size: int = 8000  # requested; lowered when the data cannot support it
    rehearsal: float = 0.2  # share of each batch replayed from earlier datasets
    seed: int = DEFAULT_SEED
    max_minutes: float = 0.0  # 0: no time limit
    compile: bool = False  # torch.compile the training forward; eager if it is unavailable or fails
    # "muon": Muon for the matrices inside the blocks, AdamW for embeddings and norms
    # (``step.MuonAdamW``); "adamw": AdamW for everything. A folder saved before this
    # setting existed trained with AdamW and reads as "adamw".
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        problems = []
        positive = ("learning_rate", "checkpoint_every", "eval_batches", "target_vocab_size")
        for name in positive:
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)!r})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append("min_lr_ratio must be in [0, 1]")
        if not 0 <= self.rehearsal < 1:
            problems.append("rehearsal must be in [0, 1)")
        if not 0 < self.val_fraction < 0.5:
            problems.append("val_fraction must be in (0, 0.5)")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        for name in ("warmup_steps", "batch_size", "weight_decay", "grad_clip", "max_minutes", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


# Each optimizer's peak learning rate at width 256 for a new model: the best of the
# ablation's sweep (README "Block and optimizer": AdamW lost 0.011 bits/byte at 2e-3,
# Muon 0.057 at 1e-3 and 0.002 at 4e-3). A time budget's plan scales it by
# 1/sqrt(width / 256) (``budget.learning_rate_for``).
LEARNING_RATES = {"adamw": 1e-3, "muon": 2e-3}


@dataclass(frozen=True)
class Recipe:
    """A new model's block design, optimizer and learning rate (see the module's docstring)."""

    arch: str = "gpt2"
    qk_norm: bool = False  # applies to llama blocks only; a user's --arch gpt2 drops it
    optimizer: str = "adamw"
    # None: the optimizer's rate in LEARNING_RATES. A number is the rate for the recipe's
    # own optimizer; a user who picks the other optimizer gets that one's rate.
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        assert self.arch in ARCHS and self.optimizer in OPTIMIZERS, self
        assert self.learning_rate is None or self.learning_rate > 0, self

    def model_settings(self, model_overrides: dict) -> dict:
        """``ModelConfig`` settings of a new model: the recipe's block design where the user chose none."""
        arch = model_overrides.get("arch", self.arch)
        return {"arch": arch, "qk_norm": self.qk_norm and arch == "llama"}

    def base_learning_rate(self, train_overrides: dict) -> float:
        """The peak rate at width 256 for the optimizer a new model will use (the user's, else the recipe's)."""
        optimizer = train_overrides.get("optimizer", self.optimizer)
        if optimizer == self.optimizer and self.learning_rate is not None:
            return self.learning_rate
        return LEARNING_RATES[optimizer]

    def train_settings(self, train_overrides: dict) -> dict:
        """``TrainConfig`` settings of a new model (the user's flags are laid over them)."""
        return {"optimizer": train_overrides.get("optimizer", self.optimizer),
                "learning_rate": self.base_learning_rate(train_overrides)}


# What a new model trains with: the llama block under Muon (README "Block and optimizer": at
# equal wall time, 0.17 bits/byte below the GPT-2 block with AdamW, and 0.017 below the llama
# block with AdamW at its best rate; QK-norm bought nothing for its time).
NEW_MODEL_RECIPE = Recipe(arch="llama", optimizer="muon")


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for ``step`` (0-based) of a run: linear warm-up, then cosine decay."""
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


def check_epochs(epochs: object) -> None:
    """Refuse an epoch count a caller could pass by mistake (a string, a bool, zero)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= MAX_EPOCHS:
        raise ValueError(f"epochs must be a whole number from 1 to {MAX_EPOCHS} (got {epochs!r})")


def check_minutes(minutes: object) -> None:
    """Refuse a time budget outside 0 (none) to a week."""
    if not (isinstance(minutes, (int, float)) and 0 <= minutes <= MAX_BUDGET_MINUTES):
        raise ValueError(f"the time budget must be from 0 to {MAX_BUDGET_MINUTES} minutes (got {minutes!r})")
