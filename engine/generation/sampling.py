"""Choosing the next token: ``GenerationConfig`` and the pure sampling functions.

``sample_next_token(logits, rng, temperature, top_k, top_p, ...)`` is the one place a
token is drawn (temperature 0 is greedy); the repetition penalty works on the top-k
candidates only, so a step costs the same whatever the vocabulary.
"""
from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import asdict, dataclass, fields

import torch

REPETITION_WINDOW = 64  # how many recent tokens the repetition penalty looks at


@dataclass
class GenerationConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    repetition_penalty: float = 1.1  # 1.0 disables
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 100_000:
            problems.append("max_new_tokens must be a whole number from 1 to 100000")
        if not 0.0 <= self.temperature <= 5.0:
            problems.append("temperature must be between 0 and 5")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append("top_k must be 0 (off) or a positive whole number")
        if not 0.0 < self.top_p <= 1.0:
            problems.append("top_p must be in (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 10.0:
            problems.append("repetition_penalty must be between 1 and 10")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return cls(**d)


def penalised(value: float, penalty: float) -> float:
    """The repetition penalty on one logit: positive ones divided, negative ones multiplied."""
    return value / penalty if value > 0 else value * penalty


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make recently used tokens less likely, over the whole vocabulary (a new tensor)."""
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[recent]
    logits[recent] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def candidate_count(vocab: int, top_k: int, penalty: float) -> int:
    """How many of the largest logits sampling looks at: the top-k (or the whole
    vocabulary), and ``REPETITION_WINDOW`` more when the penalty may push some of those
    down (it lowers at most that many). The same count for every step of a generation,
    so that the rows of a batch with equal settings share one ``top_candidates``."""
    k = top_k if top_k and top_k < vocab else vocab
    return min(vocab, k + (REPETITION_WINDOW if penalty != 1.0 else 0))


def top_candidates(logits: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest logits and their ids along the last dimension, largest first.

    One call for a 1-D row or for many rows (B, vocab): each row's result is the same
    either way, ties included (one kernel, row by row).
    """
    if count < logits.shape[-1]:
        return torch.topk(logits, count)
    return torch.sort(logits, descending=True)


def best_candidates(logits: torch.Tensor, k: int, penalty: float = 1.0,
                    recent: frozenset[int] | set[int] = frozenset(),
                    top: tuple[list[float], list[int]] | None = None) -> tuple[list[float], list[int]]:
    """The ``k`` largest logits after the repetition penalty, largest first, as lists.

    The penalty only ever lowers a logit, so the k best after it are among the
    k + len(recent) best before it: at most len(recent) of those can drop out, and
    every id beyond them was already below k unpenalised ones. So only that many
    (``candidate_count``) are taken from the vocabulary, and the penalty and the
    re-sort run in Python on those few, never as tensor passes over the whole
    vocabulary: at batch size 1 each such pass costs more than the arithmetic (this
    runs every token). ``top``: those candidates as lists, taken already (a batch's).
    """
    if top is None:
        values, ids = top_candidates(logits, candidate_count(logits.numel(), k, penalty))
        values, ids = values.tolist(), ids.tolist()
    else:
        values, ids = top
    if penalty != 1.0 and recent:
        hit = [i in recent for i in ids]
        if any(hit):  # else nothing moves: the candidates are in order already
            # penalised(), written out: this runs for every candidate of every token
            values = [(v / penalty if v > 0 else v * penalty) if h else v for v, h in zip(values, hit)]
            order = sorted(range(len(ids)), key=values.__getitem__, reverse=True)
            values, ids = [values[j] for j in order], [ids[j] for j in order]
    return values[:k], ids[:k]


def sample_next_token(logits: torch.Tensor, rng: random.Random, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0,
                      recent: frozenset[int] | set[int] = frozenset(),
                      top: tuple[list[float], list[int]] | None = None) -> int:
    """Pick the next id from 1-D fp32 ``logits``. Temperature 0 (or near it) is greedy.

    ``recent`` ids get the repetition ``penalty`` first (see ``best_candidates``).
    With top-k set, only the k best logits are sorted, never the whole vocabulary;
    temperature keeps their order, so it is applied to those k alone. Top-p keeps the
    smallest prefix whose mass reaches p. The softmax and the draw are plain Python
    over the k values: each tensor operation costs several microseconds at this size.
    ``top``: ``top_candidates(logits, candidate_count(vocab, top_k, penalty))`` as
    lists, when a batch has taken them for many rows at once (not used when greedy).
    """
    if temperature < 1e-4:  # dividing by a near-zero temperature overflows: it is greedy anyway
        if penalty == 1.0 or not recent:
            return int(torch.argmax(logits))
        return best_candidates(logits, 1, penalty, recent)[1][0]
    vocab = logits.numel()
    values, ids = best_candidates(logits, top_k if top_k and top_k < vocab else vocab, penalty, recent, top)
    top = values[0]
    weights = [math.exp((v - top) / temperature) for v in values]
    cumulative = list(itertools.accumulate(weights))
    kept = len(weights)
    if top_p < 1.0:
        # Token i stays while the mass before it, cumulative[i - 1], is below p of the whole.
        kept = min(kept, 1 + bisect.bisect_left(cumulative, top_p * cumulative[-1]))
    # The first token whose cumulative mass exceeds u: never one of weight 0,
    # since the token before it has the same cumulative mass.
    u = rng.random() * cumulative[kept - 1]
    return ids[min(bisect.bisect_right(cumulative, u, 0, kept), kept - 1)]
