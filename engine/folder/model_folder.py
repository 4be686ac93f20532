"""The model folder: the one module that knows its format.

One folder is one model. Its files, what writes them and how they are read:

    config.json          format version, model config, tokenizer kind, training settings
    model.pth            weights only (what the Response menu loads)
    checkpoint.pth       full training state (weights, optimizer, schedule, data position, RNG)
    tokenizer.json       the BPE tokenizer          } one of the two, as
    tokenizer.model      the SentencePiece model    } tokenizer_type.txt says
    tokenizer_type.txt   "bpe" or "sentencepiece"
    history.json         every step's loss and learning rate, every validation, every run
    datasets.json        every data set trained on, with its latest validation result
    datasets/            held-out text and a rehearsal sample of each data set
    manifest.json        size and SHA-256 of the weight files of the last complete save
    cache/               token ids of the training data, keyed by content and tokenizer
    loss_curves.png      the loss curves, when ``status --plot`` has drawn them
    .lock                held by the process that trains the folder

A save is one unit (``commit_save``): every file of it is staged, then a journal
commits them together (``storage.commit_files``). Nothing here ever unpickles code:
tensors load with ``weights_only=True`` and the config is validated before any
tensor is allocated.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.data.tokenizer import BaseTokenizer, normalize_kind, tokenizer_class, tokenizer_from_bytes
from engine.folder.records import DatasetRecord, DatasetTexts, FolderMeta, FolderStatus, History, ModelSummary
from engine.model.gpt import GPT
from engine.runtime import storage

# 2: the context length is saved as "context" (was "max_seq_len") and the requested
# vocabulary as "target_vocab_size" (was "vocab_size"); version 1 folders are read
# and upgraded in memory (``FolderMeta.from_dict``), and written as version 2 at their
# next save.
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pth"
CHECKPOINT_FILE = "checkpoint.pth"
HISTORY_FILE = "history.json"
DATASETS_FILE = "datasets.json"
DATASETS_DIR = "datasets"
MANIFEST_FILE = "manifest.json"
TOKENIZER_TYPE_FILE = "tokenizer_type.txt"
LOCK_FILE = ".lock"
CACHE_DIR = "cache"
LOSS_PLOT_FILE = "loss_curves.png"


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer kind in force, and a note when it is not the one asked for."""

    kind: str | None  # None: nothing asked and no model yet (the menu asks)
    note: str = ""
    existing: bool = False  # the folder's model decided it


def tokenizer_files(tok: BaseTokenizer) -> dict[str, bytes]:
    """The files that hold a tokenizer in a model folder (they join a save)."""
    return {tok.filename: tok.to_bytes(), TOKENIZER_TYPE_FILE: (tok.kind + "\n").encode()}


class ModelFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock_depth = 0
        self._lock_fd: int | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def cache_dir(self) -> Path:
        return self.path / CACHE_DIR

    def has_model(self) -> bool:
        return self.config_path.exists() and self.file(WEIGHTS_FILE).exists()

    # -- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer_lock(self):
        """Hold the folder's single-writer lock (re-entrant within one process).

        An OS file lock (flock) is released by the kernel when its process dies, so a
        crashed trainer never leaves the folder locked.
        """
        if self._lock_depth == 0:
            self.check_writable()
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # no flock (Windows): best effort, no lock
                pass
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ValueError(f"{self.path} is being trained by process {holder}; wait for it to "
                                 "finish or use another --model-dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = None

    def check_writable(self) -> None:
        """Fail early, before training starts, if the folder cannot hold a model."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file, not a folder; choose another --model-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"cannot write to the model folder {self.path}: {exc.strerror}") from exc
        storage.remove_stale_temp_files(self.path)

    def recover(self) -> None:
        """Finish or discard a save that a crash interrupted (see ``storage.commit_files``)."""
        if self.path.is_dir():
            storage.recover(self.path)
            storage.remove_stale_temp_files(self.path)

    def commit_save(self, weights: dict[str, torch.Tensor], checkpoint: dict[str, Any], meta: FolderMeta,
                    history: History, datasets: list[DatasetRecord],
                    extra_files: dict[str, bytes] | None = None) -> None:
        """Write one complete save: weights, checkpoint, history, data sets, config, manifest.

        ``extra_files`` (a new or grown tokenizer) join the same unit. The manifest holds
        the size and checksum of both weight files, so damage is found on load.
        """
        blobs = {WEIGHTS_FILE: storage.torch_bytes(weights), CHECKPOINT_FILE: storage.torch_bytes(checkpoint)}
        manifest = {"step": meta.progress.step,
                    "files": {name: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                              for name, b in blobs.items()}}
        files = {**blobs, HISTORY_FILE: json.dumps(history.to_dict()),
                 DATASETS_FILE: json.dumps([d.to_dict() for d in datasets], indent=1), **(extra_files or {}),
                 CONFIG_FILE: json.dumps({**meta.to_dict(), "format_version": FORMAT_VERSION}, indent=2),
                 MANIFEST_FILE: json.dumps(manifest, indent=1)}
        storage.commit_files(self.path, files)

    def write_dataset_texts(self, dataset_id: str, texts: DatasetTexts) -> str:
        """Save a data set's held-out text and rehearsal sample; returns its relative path."""
        relative = f"{DATASETS_DIR}/{dataset_id}.json"
        storage.write_json(self.path / relative, texts.to_dict())
        return relative

    # -- reading ------------------------------------------------------------------------
    def tokenizer_kind(self) -> str | None:
        """The kind of tokenizer the folder holds, or None."""
        path = self.file(TOKENIZER_TYPE_FILE)
        if not path.exists():
            return None
        return normalize_kind(path.read_text(encoding="utf-8"))

    def choose_tokenizer(self, requested: str | None) -> TokenizerChoice:
        """The rule, decided here only: an existing model's tokenizer always wins."""
        existing = self.tokenizer_kind() if self.has_model() else None
        if existing:
            note = ""
            if requested and normalize_kind(requested) != existing:
                note = f"{self.path} already holds a {existing} model; using its tokenizer"
            return TokenizerChoice(existing, note, existing=True)
        return TokenizerChoice(normalize_kind(requested) if requested else None)

    def load_tokenizer(self) -> BaseTokenizer:
        kind = self.tokenizer_kind()
        if kind is None:
            raise FileNotFoundError(f"no tokenizer in {self.path}; train a model first")
        path = self.file(tokenizer_class(kind).filename)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; the model folder is incomplete")
        return tokenizer_from_bytes(kind, path.read_bytes(), str(path))

    def load_verified(self, name: str):
        """``torch.load`` a weight file after checking it against the manifest.

        A truncated, zero-byte or bit-flipped file is refused with a message instead of
        being half-loaded.
        """
        path = self.file(name)
        manifest_path = self.file(MANIFEST_FILE)
        if manifest_path.exists():
            expected = storage.read_json(manifest_path).get("files", {}).get(name)
            if expected is not None:
                data = path.read_bytes()
                if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
                    raise ValueError(f"{path} is damaged (its size or checksum differs from "
                                     f"{MANIFEST_FILE}); restore it from a backup")
        return storage.load_torch(path)

    def read_meta(self) -> FolderMeta:
        """``config.json``, validated (format version, tokenizer kind, model config) and
        upgraded in memory from older formats (written as today's at the next save)."""
        meta = storage.read_json(self.config_path)
        if not isinstance(meta, dict):
            raise ValueError(f"{self.config_path} must hold a JSON object")
        version = meta.get("format_version")
        if not isinstance(version, int):
            raise ValueError(f"{self.config_path} has no format_version; it was not written by this tool")
        if version > FORMAT_VERSION:
            raise ValueError(f"{self.path} was written by a newer version (format {version}, "
                             f"this program reads up to {FORMAT_VERSION}); upgrade custom-llm")
        normalize_kind(str(meta.get("tokenizer", "")))
        return FolderMeta.from_dict(meta)  # validates the model config before anything is allocated

    def read_history(self) -> History:
        path = self.file(HISTORY_FILE)
        return History.from_dict(storage.read_json(path)) if path.exists() else History()

    def read_datasets(self) -> list[DatasetRecord]:
        path = self.file(DATASETS_FILE)
        return [DatasetRecord.from_dict(d) for d in storage.read_json(path)] if path.exists() else []

    def read_dataset_texts(self, record: DatasetRecord) -> DatasetTexts:
        """A data set's saved texts (all empty if the file is gone)."""
        path = self.path / record.file
        if not path.exists():
            return DatasetTexts()
        return DatasetTexts.from_dict(storage.read_json(path))

    def status(self) -> FolderStatus | None:
        """Progress summary for the Training Status screen (reads the folder only)."""
        if not self.has_model():
            return None
        meta = self.read_meta()
        history = self.read_history()
        evals = history.evals
        return FolderStatus(
            tokenizer=meta.tokenizer, model=meta.model, steps=meta.progress.step,
            tokens_seen=meta.progress.tokens_seen, epochs=meta.progress.epochs_done,
            last_eval=evals[-1] if evals else None,
            best_val_loss=min((e.val_loss for e in evals), default=None),
            losses=[s.loss for s in history.steps], runs=history.runs, datasets=self.read_datasets(),
            chat_tuned=meta.chat_tuned)

    def summary(self) -> ModelSummary | None:
        """Size and progress from config.json, without loading weights; None without a model."""
        if not self.has_model():
            return None
        meta = self.read_meta()
        config = meta.model
        with torch.device("meta"):  # exact parameter count, nothing allocated
            parameters = GPT(config).num_params()
        return ModelSummary(parameters=parameters, tokenizer=meta.tokenizer, vocab_size=config.vocab_size,
                            n_layer=config.n_layer, n_head=config.n_head, d_model=config.d_model,
                            context=config.context, training_steps=meta.progress.step, chat_tuned=meta.chat_tuned)

    def load_model(self, device: torch.device | str = "cpu") -> tuple[GPT, BaseTokenizer, FolderMeta]:
        """The trained model in eval mode, its tokenizer and metadata, all cross-checked."""
        self.recover()
        if not self.has_model():
            raise FileNotFoundError(f"no trained model in {self.path}; train one first (Training menu)")
        meta = self.read_meta()
        config = meta.model
        tok = self.load_tokenizer()
        if tok.kind != meta.tokenizer:
            raise ValueError(f"config.json says {meta.tokenizer} but the folder holds a {tok.kind} tokenizer")
        if tok.vocab_size != config.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model expects "
                             f"{config.vocab_size}; the folder is inconsistent (restore it or retrain)")
        # A config can claim any size; the weights on disk cannot lie about theirs. Check
        # before allocating, so a hostile config cannot make us reserve absurd memory.
        expected = config.n_params_estimate() * 4
        actual = self.file(WEIGHTS_FILE).stat().st_size
        if expected > 2 * actual + 2**20:
            raise ValueError(f"config.json describes ~{expected / 2**20:.0f} MiB of weights but "
                             f"{WEIGHTS_FILE} holds {actual / 2**20:.1f} MiB; the folder is inconsistent")
        state = self.load_verified(WEIGHTS_FILE)
        model = GPT(config)
        load_state(model, state, self.file(WEIGHTS_FILE))
        return model.to(device).eval(), tok, meta


def load_state(model: GPT, state: dict, source: Path) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{source} does not hold a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{source} does not match config.json: {str(exc).splitlines()[0]}") from exc
