"""Token ids and training windows (the second and third steps: tokens -> windows).

Token ids are computed once per (text, tokenizer) pair and cached in the model
folder as a raw array that is memory-mapped on later runs; documents are joined with
the end-of-text token. ``TokenDataset`` packs the ids into windows of ``window + 1``
tokens and keeps the last ~5% for validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.sources import Source
from engine.data.tokenizer import BaseTokenizer, chunk_text
from engine.runtime import storage


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def tokenize_source(source: Source, tok: BaseTokenizer, cache_dir: Path) -> np.ndarray:
    """Token ids of the whole source, documents separated by end-of-text.

    Cached as ``cache_dir/<content>-<tokenizer>.bin`` and memory-mapped, so running
    again on the same data skips tokenization and never holds the ids in RAM twice.
    """
    dtype = _id_dtype(tok.vocab_size)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{source.content_hash()[:20]}-{tok.fingerprint()}.{dtype.name}.bin"
    if not path.exists():
        total = 0

        def write(f) -> None:
            nonlocal total
            for doc in source.documents():
                wrote_any = False
                for block in doc:
                    if not block.strip() and not wrote_any:
                        continue
                    pieces = list(chunk_text(block, 16_000))
                    for ids in tok.encode_batch(pieces):
                        f.write(np.asarray(ids, dtype=dtype).tobytes())
                        total += len(ids)
                        wrote_any = wrote_any or bool(ids)
                if wrote_any:
                    f.write(np.asarray([tok.eot_id], dtype=dtype).tobytes())
                    total += 1

        storage.atomic_write(path, write)
        if total == 0:
            path.unlink()
            raise ValueError(f"{source.name} contains no text to train on")
    if path.stat().st_size == 0:
        raise ValueError(f"{source.name} contains no text to train on")
    return np.memmap(path, dtype=dtype, mode="r")


def load_cached_tokens(path: Path) -> np.ndarray:
    """Memory-map a cache file written by ``tokenize_source`` (dtype is in its name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the token cache {path.name} is gone; train from the original data again")
    dtype = np.dtype(path.name.split(".")[-2])
    return np.memmap(path, dtype=dtype, mode="r")


def remove_stale_caches(cache_dir: Path, tok: BaseTokenizer) -> None:
    """Token caches (text and conversations) made with another tokenizer can never be used again."""
    fp = tok.fingerprint()
    for p in Path(cache_dir).glob("*"):
        if p.suffix in (".bin", ".npz") and f"-{fp}." not in p.name:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------
# Windows and batches

MIN_WINDOW = 8


@dataclass
class EpochPlan:
    """Which windows an epoch visits, in which order (fully determined by seed and epoch)."""

    offset: int
    order: np.ndarray  # window indices, shuffled
    batch_size: int

    @property
    def n_batches(self) -> int:
        return max(1, len(self.order) // self.batch_size)

    def batch_windows(self, i: int) -> np.ndarray:
        return self.order[i * self.batch_size:(i + 1) * self.batch_size]


class TokenDataset:
    """Token ids split into a training part and a held-out validation tail."""

    def __init__(self, tokens: np.ndarray, context: int, val_fraction: float = 0.05) -> None:
        n = len(tokens)
        # Short data gets a shorter window rather than an error, as long as both
        # parts hold at least one window.
        self.window = min(context, (n - 2) // 2)  # the window length in force
        if self.window < MIN_WINDOW:
            raise ValueError(
                f"the text is too short: {n} tokens; give at least {2 * MIN_WINDOW + 2} tokens "
                "(a few sentences)")
        self.shortened = self.window < context
        n_val = max(int(n * val_fraction), self.window + 1)
        self.train = tokens[: n - n_val]
        self.val = tokens[n - n_val:]
        # Training windows start at offset + i*window; the offset moves every epoch so
        # the model sees the text cut in different places.
        self.max_offset = min(self.window - 1, len(self.train) - 1 - self.window)
        self.n_windows = (len(self.train) - 1 - self.max_offset) // self.window

    @property
    def n_train_tokens(self) -> int:
        return len(self.train)

    def epoch_plan(self, seed: int, epoch: int, batch_size: int) -> EpochPlan:
        rng = np.random.default_rng([seed, epoch])
        offset = int(rng.integers(0, self.max_offset + 1))
        order = rng.permutation(self.n_windows)
        return EpochPlan(offset, order, min(batch_size, self.n_windows))

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.window + 1
        block = np.stack([tokens[s:s + span] for s in starts]).astype(np.int64)
        block = torch.from_numpy(block)
        return block[:, :-1], block[:, 1:]

    def train_batch(self, plan: EpochPlan, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = plan.offset + plan.batch_windows(i) * self.window
        return self._windows(self.train, starts)

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        return iter_windows(self.val, self.window, batch_size, max_batches)

    def val_batch_count(self, batch_size: int, max_batches: int) -> int:
        """How many batches ``val_batches(batch_size, max_batches)`` yields."""
        windows = max(1, (len(self.val) - 1) // max(1, min(self.window, len(self.val) - 1)))
        return min(max_batches, -(-windows // batch_size))


def iter_windows(tokens: np.ndarray, window: int, batch_size: int, max_batches: int | None = None):
    """Consecutive, non-overlapping (x, y) windows over ``tokens``, batched (for evaluation)."""
    window = max(1, min(window, len(tokens) - 1))
    n_windows = max(1, (len(tokens) - 1) // window)
    starts = np.arange(n_windows) * window
    for b, i in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        block = np.stack([tokens[s:s + window + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
        block = torch.from_numpy(block)
        yield block[:, :-1], block[:, 1:]


def encode_documents(tok: BaseTokenizer, docs: list[str]) -> np.ndarray:
    """Token ids of ``docs``, each followed by end-of-text (small, in-memory data)."""
    out: list[int] = []
    for ids in tok.encode_batch(docs):
        out.extend(ids)
        out.append(tok.eot_id)
    return np.asarray(out, dtype=np.int64)


def split_documents(tok: BaseTokenizer, ids: np.ndarray) -> list[str]:
    """Decode ids back into documents, splitting at end-of-text."""
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == tok.eot_id)
    docs, start = [], 0
    for cut in list(cuts) + [len(ids)]:
        if cut > start:
            text = tok.decode(ids[start:cut].tolist())
            if text:
                docs.append(text)
        start = cut + 1
    return docs
