"""Continuous learning: remember every dataset, replay it, grow the vocabulary.

Each dataset the model trains on leaves two samples of raw text in the model folder
(``datasets/<id>.json``): its held-out validation part and a spread-out rehearsal
sample of its training part. Raw text, not token ids, so both stay usable after
the tokenizer grows: bits per byte on the same text stays comparable, and rehearsal
windows are re-tokenized with the current tokenizer.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from engine import storage
from engine.model_folder import DATASETS_DIR
from engine.sources import Source
from engine.vocab_growth import expand_tokenizer, tokenization_drift, tokens_per_byte
from engine.windows import (
    TokenDataset,
    encode_documents,
    iter_windows,
    remove_stale_caches,
    split_documents,
)

if TYPE_CHECKING:
    from trainer import StopFlag, Trainer

Event = Callable[[str, dict], None]
VAL_TOKENS_KEPT = 200_000
REHEARSAL_CHUNKS, REHEARSAL_CHUNK_TOKENS = 400, 512
EXPANSION_SAMPLE_BYTES = 5_000_000


def _dataset_path(dataset_id: str) -> str:
    return f"{DATASETS_DIR}/{dataset_id}.json"


def register_dataset(trainer: "Trainer", dataset: TokenDataset, name: str, cache_file: str) -> None:
    """Keep the held-out text and a rehearsal sample of a dataset the model now trains on."""
    dataset_id = cache_file.split("-")[0]
    if any(d["id"] == dataset_id for d in trainer.datasets):
        return
    if any(d["name"] == name for d in trainer.datasets):  # e.g. two different typed texts
        name = f"{name} ({dataset_id[:6]})"
    tok = trainer.tokenizer
    val_docs = split_documents(tok, dataset.val[:VAL_TOKENS_KEPT])
    train = dataset.train
    n_chunks = min(REHEARSAL_CHUNKS, max(1, len(train) // REHEARSAL_CHUNK_TOKENS))
    starts = np.linspace(0, max(0, len(train) - REHEARSAL_CHUNK_TOKENS), n_chunks).astype(np.int64)
    rehearsal = [doc for s in starts for doc in split_documents(tok, train[s:s + REHEARSAL_CHUNK_TOKENS])]
    path = trainer.folder.path / _dataset_path(dataset_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(path, {"name": name, "val": val_docs, "rehearsal": rehearsal})
    trainer.datasets.append({"id": dataset_id, "name": name, "file": _dataset_path(dataset_id),
                             "added": time.strftime("%Y-%m-%d %H:%M:%S"), "latest": None})


def _load_texts(trainer: "Trainer", entry: dict) -> dict:
    path = trainer.folder.path / entry["file"]
    if not path.exists():
        return {"val": [], "rehearsal": []}
    return json.loads(path.read_text(encoding="utf-8"))


def rehearsal_pool(trainer: "Trainer", exclude: str) -> np.ndarray | None:
    """Token ids of every earlier dataset's rehearsal sample (None if nothing to replay)."""
    if trainer.config.rehearsal <= 0:
        return None
    dataset_id = exclude.split("-")[0]
    docs = [doc for d in trainer.datasets if d["id"] != dataset_id for doc in _load_texts(trainer, d)["rehearsal"]]
    if not docs:
        return None
    pool = encode_documents(trainer.tokenizer, docs)
    return pool if len(pool) > trainer.model.config.max_seq_len + 1 else None


def mix_in_rehearsal(x: torch.Tensor, y: torch.Tensor, pool: np.ndarray, config, seed_key: tuple) -> None:
    """Overwrite the last rows of a batch with random windows of earlier data (in place)."""
    batch, seq_len = x.shape
    n = int(round(config.rehearsal * batch))
    if n == 0 or batch < 2:
        return
    n = min(n, batch - 1)  # always keep some new data in the batch
    rng = np.random.default_rng([*seed_key, 1])
    starts = rng.integers(0, len(pool) - seq_len - 1, size=n)
    block = torch.from_numpy(np.stack([pool[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    x[-n:] = block[:, :-1]
    y[-n:] = block[:, 1:]


def evaluate_datasets(trainer: "Trainer") -> dict[str, dict]:
    """Loss, perplexity and bits per byte on each dataset's held-out text."""
    from trainer import estimate_loss

    trainer.load()
    results = {}
    token_bytes = trainer.tokenizer.token_bytes()
    for entry in trainer.datasets:
        docs = _load_texts(trainer, entry)["val"]
        if not docs:
            continue
        tokens = encode_documents(trainer.tokenizer, docs)
        if len(tokens) < 2:
            continue
        batches = iter_windows(tokens, trainer.model.config.max_seq_len, 8, trainer.config.eval_batches)
        results[entry["name"]] = estimate_loss(trainer.model, batches, trainer.runtime, token_bytes)
    return results


def note_latest(entry: dict, result: dict) -> None:
    entry["latest"] = {k: result[k] for k in ("val_loss", "perplexity", "bpb")}


def _grow_optimizer(trainer: "Trainer", old_param: torch.Tensor, old_rows: int) -> None:
    """Give the optimizer's moment tensors rows for the new tokens (zeros), keep the rest."""
    state = trainer.optimizer.state_dict()
    flat = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    index = next(i for i, p in enumerate(flat) if p is old_param)
    slot = state["state"].get(index)
    new_rows = trainer.model.wte.weight.shape[0] - old_rows
    if slot:
        for key in ("exp_avg", "exp_avg_sq"):
            t = slot[key]
            slot[key] = torch.cat([t, torch.zeros(new_rows, *t.shape[1:], dtype=t.dtype, device=t.device)])
    scaler_state = trainer.scaler.state_dict() if trainer.scaler is not None else None
    trainer._make_optimizer()
    trainer.optimizer.load_state_dict(state)
    if scaler_state:
        trainer.scaler.load_state_dict(scaler_state)


def expand_vocabulary(trainer: "Trainer", texts: list[str], max_new_tokens: int, on_event: Event) -> dict:
    """Grow tokenizer, embeddings and optimizer together and save them as one unit."""
    trainer.load()
    old_tok = trainer.tokenizer
    sample, size = [], 0
    for t in texts:  # learning needs a representative sample, not every byte
        sample.append(t[:EXPANSION_SAMPLE_BYTES - size])
        size += len(sample[-1])
        if size >= EXPANSION_SAMPLE_BYTES:
            break
    on_event("expanding", {"kind": old_tok.kind, "max_new": max_new_tokens})
    expansion = expand_tokenizer(old_tok, sample, max_new_tokens)
    report = {"added": expansion.n_added, "examples": expansion.added[:12],
              "old_vocab": old_tok.vocab_size, "new_vocab": expansion.tokenizer.vocab_size}
    if expansion.n_added == 0:
        return report
    new_tok = expansion.tokenizer
    old_val = [doc for d in trainer.datasets for doc in _load_texts(trainer, d)["val"]]
    report.update(tokens_per_byte_before=tokens_per_byte(old_tok, sample),
                  tokens_per_byte_after=tokens_per_byte(new_tok, sample),
                  drift=tokenization_drift(old_tok, new_tok, old_val) if old_val else 0.0)
    model = trainer.model
    old_param, old_rows = model.wte.weight, model.wte.weight.shape[0]
    with torch.no_grad():
        emb = model.wte.weight
        rows = torch.stack([emb[ids].mean(dim=0) if ids else emb.mean(dim=0) for ids in expansion.parts])
    model.resize_vocab(new_tok.vocab_size, rows)
    _grow_optimizer(trainer, old_param, old_rows)
    trainer.tokenizer = new_tok
    if trainer.state.get("run") and not trainer.state["run"].get("finished"):
        trainer.state["run"]["finished"] = True  # its token cache used the old vocabulary
    trainer.history.setdefault("expansions", []).append(
        {"step": trainer.state["step"], "added": report["added"], "new_vocab": report["new_vocab"]})
    trainer.save_checkpoint({new_tok.filename: new_tok.to_bytes()})
    remove_stale_caches(trainer.folder.cache_dir, new_tok)
    return report


def train_on_new_data(trainer: "Trainer", new_texts, epochs: int, expand_vocab: bool, max_new_tokens: int,
                      on_event: Event, stop: "StopFlag | None") -> dict:
    from engine.sources import source_from_text

    if isinstance(new_texts, Source):
        source = new_texts
    else:
        texts = [t for t in new_texts if t and t.strip()]
        if not texts:
            raise ValueError("the new data is empty")
        source = source_from_text(texts[0], name="new text")
        source.texts.extend(texts[1:])
    trainer.load()
    before = evaluate_datasets(trainer)
    report: dict = {"expansion": None}
    if expand_vocab:
        texts = list(source.sample_for_tokenizer(EXPANSION_SAMPLE_BYTES))
        report["expansion"] = expand_vocabulary(trainer, texts, max_new_tokens, on_event)
    result = trainer.train(source, epochs, on_event, stop)
    after = evaluate_datasets(trainer)
    for entry in trainer.datasets:
        if entry["name"] in after:
            note_latest(entry, after[entry["name"]])
    trainer.save_checkpoint()
    report.update(result=result, table=[{"dataset": name, "before": before.get(name), "after": res}
                                        for name, res in after.items()])
    return report
