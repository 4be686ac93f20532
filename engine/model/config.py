"""The model's shape: ``ModelConfig``, checked on creation and read back from config.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Guard rails for configs read from disk: a hostile or corrupt config.json must not
# make us allocate absurd amounts of memory before anything else is checked.
MAX_PARAMS = 20_000_000_000
MAX_VOCAB = 1_000_000
MAX_CONTEXT = 65_536
MAX_LAYERS = 1_000
MAX_WIDTH = 65_536


@dataclass
class ModelConfig:
    vocab_size: int
    context: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 0  # 0 means 4 * d_model, the GPT-2 ratio
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.d_ff == 0 and isinstance(self.d_model, int):
            self.d_ff = 4 * self.d_model
        problems = []
        for name in ("vocab_size", "context", "d_model", "n_layer", "n_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not problems:
            if self.d_model % self.n_head:
                problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
            if self.vocab_size > MAX_VOCAB:
                problems.append(f"vocab_size {self.vocab_size} exceeds {MAX_VOCAB}")
            if self.n_layer > MAX_LAYERS:
                problems.append(f"n_layer {self.n_layer} exceeds {MAX_LAYERS}")
            if max(self.d_model, self.d_ff) > MAX_WIDTH or self.n_head > self.d_model:
                problems.append(f"d_model/d_ff/n_head ({self.d_model}/{self.d_ff}/{self.n_head}) are out of range")
            if self.context > MAX_CONTEXT:
                problems.append(f"context {self.context} exceeds {MAX_CONTEXT}")
            if self.n_params_estimate() > MAX_PARAMS:
                problems.append(f"the model would have ~{self.n_params_estimate():,} parameters; too large")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def n_params_estimate(self) -> int:
        per_layer = 4 * self.d_model * self.d_model + 2 * self.d_model * self.d_ff
        return self.n_layer * per_layer + (self.vocab_size + self.context) * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)
