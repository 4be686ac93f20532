"""What the model remembers of every data set it trained on, and the replay of it.

Each data set leaves two samples of raw text in the model folder
(``datasets/<id>.json``): its held-out validation part and a spread-out rehearsal
sample of its training part. Raw text, not token ids, so both stay usable after the
tokenizer grows: bits per byte on the same text stays comparable, and rehearsal
windows are re-tokenized with the current tokenizer.

The Trainer owns one ``DatasetMemory``; this module knows nothing of training.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from engine.data.chat_format import Message
from engine.data.tokenizer import BaseTokenizer
from engine.data.windows import TokenDataset, encode_documents, split_documents
from engine.folder.model_folder import ModelFolder
from engine.folder.records import DatasetRecord, DatasetTexts, EvalResult, RunKind

VAL_TOKENS_KEPT = 200_000
REHEARSAL_CHUNKS, REHEARSAL_CHUNK_TOKENS = 400, 512


def dataset_id_of(cache_file: str) -> str:
    """A data set's id is the content-hash part of its token-cache file name."""
    return cache_file.split("-")[0]


class DatasetMemory:
    """The records of ``datasets.json`` and the texts they point to."""

    def __init__(self, folder: ModelFolder, records: list[DatasetRecord] | None = None) -> None:
        self.folder = folder
        self.records: list[DatasetRecord] = records or []

    def register(self, tok: BaseTokenizer, dataset: TokenDataset, name: str, cache_file: str) -> None:
        """Keep the held-out text and a rehearsal sample of a data set the model now trains on."""
        dataset_id = dataset_id_of(cache_file)
        if any(r.id == dataset_id for r in self.records):
            return
        if any(r.name == name for r in self.records):  # e.g. two different typed texts
            name = f"{name} ({dataset_id[:6]})"
        val_docs = split_documents(tok, dataset.val[:VAL_TOKENS_KEPT])
        train = dataset.train
        n_chunks = min(REHEARSAL_CHUNKS, max(1, len(train) // REHEARSAL_CHUNK_TOKENS))
        starts = np.linspace(0, max(0, len(train) - REHEARSAL_CHUNK_TOKENS), n_chunks).astype(np.int64)
        rehearsal = [doc for s in starts for doc in split_documents(tok, train[s:s + REHEARSAL_CHUNK_TOKENS])]
        relative = self.folder.write_dataset_texts(dataset_id, DatasetTexts(name, val_docs, rehearsal))
        self.records.append(DatasetRecord(dataset_id, name, relative, time.strftime("%Y-%m-%d %H:%M:%S")))

    def register_conversations(self, name: str, cache_file: str, held_out: list[list[Message]]) -> None:
        """Keep the held-out conversations of a conversation set (chat runs are not replayed)."""
        dataset_id = dataset_id_of(cache_file)
        if any(r.id == dataset_id for r in self.records):
            return
        relative = self.folder.write_dataset_texts(dataset_id, DatasetTexts(name, conversations=held_out))
        self.records.append(DatasetRecord(dataset_id, name, relative, time.strftime("%Y-%m-%d %H:%M:%S"),
                                          kind=RunKind.CHAT))

    def held_out_texts(self) -> list[tuple[DatasetRecord, list[str]]]:
        """Every text data set's held-out documents (those that have any)."""
        texts = [(r, self.folder.read_dataset_texts(r).val) for r in self.records if r.kind is RunKind.TEXT]
        return [(record, docs) for record, docs in texts if docs]

    def held_out_conversations(self) -> list[tuple[DatasetRecord, list[list[Message]]]]:
        """Every conversation set's held-out conversations."""
        found = []
        for record in self.records:
            if record.kind is RunKind.CHAT:
                convs = self.folder.read_dataset_texts(record).conversations or []
                if convs:
                    found.append((record, convs))
        return found

    def rehearsal_pool(self, tok: BaseTokenizer, exclude_cache_file: str, min_tokens: int) -> np.ndarray | None:
        """Token ids of every other data set's rehearsal sample (None if too little to replay)."""
        exclude = dataset_id_of(exclude_cache_file)
        docs = [doc for r in self.records if r.id != exclude for doc in self.folder.read_dataset_texts(r).rehearsal]
        if not docs:
            return None
        pool = encode_documents(tok, docs)
        return pool if len(pool) > min_tokens else None

    def note_latest(self, dataset_id: str, result: EvalResult) -> None:
        """Remember a data set's newest validation result."""
        for record in self.records:
            if record.id == dataset_id:
                record.latest = result


def mix_in_rehearsal(x: torch.Tensor, y: torch.Tensor, pool: np.ndarray, share: float, seed_key: tuple) -> int:
    """Overwrite the last rows of a batch with random windows of earlier data (in place).

    Returns how many rows were replaced.
    """
    batch, window = x.shape
    n = int(round(share * batch))
    if n == 0 or batch < 2:
        return 0
    n = min(n, batch - 1)  # always keep some new data in the batch
    rng = np.random.default_rng([*seed_key, 1])
    starts = rng.integers(0, len(pool) - window - 1, size=n)
    block = torch.from_numpy(np.stack([pool[s:s + window + 1] for s in starts]).astype(np.int64))
    x[-n:] = block[:, :-1]
    y[-n:] = block[:, 1:]
    return n


def balance_replayed_targets(y: torch.Tensor, replayed: int, share: float, seed_key: tuple) -> None:
    """In a conversation batch, let the replayed text rows carry ``share`` of the learned targets.

    A text row learns at every position; a conversation row only at the assistant's
    replies, a fraction of them. Left alone, two replayed rows out of eight carried
    about half the loss of a chat batch and slowed fine-tuning (turn-end rate 85%
    against 100% without rehearsal, scripts/chat_experiment.py). So a random subset of
    the replayed targets is kept (in place); the rows stay whole as context.
    """
    if replayed == 0:
        return
    chat_targets = int((y[:-replayed] >= 0).sum())
    text = y[-replayed:]
    wanted = int(round(chat_targets * share / (1 - share)))
    if wanted >= text.numel():
        return
    rng = np.random.default_rng([*seed_key, 2])
    drop = np.ones(text.numel(), dtype=bool)
    drop[rng.choice(text.numel(), size=wanted, replace=False)] = False
    text.view(-1)[torch.from_numpy(drop)] = -1
