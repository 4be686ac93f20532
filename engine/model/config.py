"""The model's shape: ``ModelConfig``, checked on creation and read back from config.json.

Two block designs share the rest of the network (``arch``):

- ``gpt2``: learned positions, LayerNorm, a GELU MLP four times as wide, biases.
- ``llama``: rotary positions, RMSNorm, a SwiGLU MLP of the same parameter count
  (two thirds of four times as wide, rounded up to a multiple of 64), no biases; with
  ``qk_norm`` the queries and keys are RMS-normed per head before the rotation.

A folder written before ``arch`` existed has no such key: it reads as ``gpt2``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Guard rails for configs read from disk: a hostile or corrupt config.json must not
# make us allocate absurd amounts of memory before anything else is checked.
MAX_PARAMS = 20_000_000_000
MAX_VOCAB = 1_000_000
MAX_CONTEXT = 65_536
MAX_LAYERS = 1_000
MAX_WIDTH = 65_536
ARCHS = ("gpt2", "llama")
NORM_EPS = 1e-5  # LayerNorm's and RMSNorm's epsilon (the exports write it)


def swiglu_width(d_model: int) -> int:
    """The SwiGLU hidden width whose three matrices hold what GPT-2's two of 4 x d_model do.

    >>> swiglu_width(256)
    704
    """
    return -(-8 * d_model // 3 // 64) * 64


@dataclass
class ModelConfig:
    vocab_size: int
    context: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 0  # 0: 4 x d_model for gpt2, swiglu_width(d_model) for llama
    dropout: float = 0.1
    arch: str = "gpt2"
    qk_norm: bool = False  # llama only
    rope_theta: float = 10_000.0  # llama only: the base of the rotary frequencies

    def __post_init__(self) -> None:
        if self.d_ff == 0 and isinstance(self.d_model, int) and not isinstance(self.d_model, bool):
            self.d_ff = swiglu_width(self.d_model) if self.arch == "llama" else 4 * self.d_model
        problems = []
        for name in ("vocab_size", "context", "d_model", "n_layer", "n_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {', '.join(ARCHS)} (got {self.arch!r})")
        elif self.arch != "llama" and self.qk_norm:
            problems.append("qk_norm needs arch llama")
        if not isinstance(self.qk_norm, bool):
            problems.append(f"qk_norm must be true or false (got {self.qk_norm!r})")
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) \
                or not 1.0 < self.rope_theta < 1e9:
            problems.append(f"rope_theta must be a number above 1 (got {self.rope_theta!r})")
        if not problems:
            if self.d_model % self.n_head:
                problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
            elif self.arch == "llama" and (self.d_model // self.n_head) % 2:
                problems.append(f"rotary positions need an even head size (d_model {self.d_model} / n_head "
                                f"{self.n_head} is odd)")
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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def n_params_estimate(self) -> int:
        mlp_matrices = 3 if self.arch == "llama" else 2
        per_layer = 4 * self.d_model * self.d_model + mlp_matrices * self.d_model * self.d_ff
        positions = self.context if self.arch == "gpt2" else 0
        return self.n_layer * per_layer + (self.vocab_size + positions) * self.d_model

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
