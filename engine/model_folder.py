"""The model folder: what lives in it, and how to read it back safely.

One folder is one model. Its files:

    config.json          format version, model config, tokenizer kind, training settings
    model.pth            weights only (what Response Mode loads)
    checkpoint.pth       full training state (weights, optimizer, schedule, data position, RNG)
    tokenizer.json       the BPE tokenizer          } one of the two, as
    tokenizer.model      the SentencePiece model    } tokenizer_type.txt says
    tokenizer_type.txt   "bpe" or "sentencepiece"
    history.json         every step's loss and learning rate, every validation
    datasets.json        every dataset trained on, with its latest validation results
    datasets/            held-out validation text and a rehearsal sample of each dataset
    manifest.json        size and SHA-256 of the weight files of the last complete save
    cache/               token ids of the training data, keyed by content and tokenizer

Nothing here ever unpickles code: tensors load with ``weights_only=True`` and the
config is validated before any tensor is allocated.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from engine import storage
from engine.tokenizer import BaseTokenizer, load_tokenizer, normalize_kind
from model import GPT, ModelConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pth"
CHECKPOINT_FILE = "checkpoint.pth"
HISTORY_FILE = "history.json"
DATASETS_FILE = "datasets.json"
DATASETS_DIR = "datasets"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
CACHE_DIR = "cache"


class ModelFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock_depth = 0
        self._lock_fd: int | None = None

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

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def cache_dir(self) -> Path:
        return self.path / CACHE_DIR

    def recover(self) -> None:
        """Finish or discard a save that a crash interrupted (see ``storage.commit_files``)."""
        if self.path.is_dir():
            storage.recover(self.path)
            storage.remove_stale_temp_files(self.path)

    def read_datasets(self) -> list[dict]:
        path = self.file(DATASETS_FILE)
        return storage.read_json(path) if path.exists() else []

    def has_model(self) -> bool:
        return self.config_path.exists() and self.file(WEIGHTS_FILE).exists()

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

    # -- metadata -------------------------------------------------------------------
    def read_meta(self) -> dict:
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
        ModelConfig.from_dict(meta.get("model"))  # validates before anything is allocated
        return meta

    def read_history(self) -> dict:
        path = self.file(HISTORY_FILE)
        if not path.exists():
            return {"steps": [], "evals": [], "runs": []}
        history = storage.read_json(path)
        for key in ("steps", "evals", "runs"):
            history.setdefault(key, [])
        return history

    # -- loading -----------------------------------------------------------------------
    def load_tokenizer(self) -> BaseTokenizer:
        return load_tokenizer(self.path)

    def load_model(self, device: torch.device | str = "cpu") -> tuple[GPT, BaseTokenizer, dict]:
        """The trained model in eval mode, its tokenizer and metadata, all cross-checked."""
        self.recover()
        if not self.has_model():
            raise FileNotFoundError(f"no trained model in {self.path}; train one first (Training menu)")
        meta = self.read_meta()
        config = ModelConfig.from_dict(meta["model"])
        tok = self.load_tokenizer()
        if tok.kind != meta["tokenizer"]:
            raise ValueError(f"config.json says {meta['tokenizer']} but the folder holds a {tok.kind} tokenizer")
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
