"""Training: build or load a model folder, run epochs, checkpoint, resume exactly.

The ``Trainer`` owns one model folder. ``train(source, epochs)`` either starts a new
run on that data or, when the folder holds an interrupted run on the same data,
resumes it exactly: same data order, same learning-rate schedule, same RNG state.
Progress is reported through a callback, so the interface decides the wording.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from engine.data.chat_format import ChatTokenIds, Message
from engine.data.chat_windows import ChatDataset, split_conversations
from engine.data.conversations import ConversationSource
from engine.data.sources import Source
from engine.data.tokenizer import BaseTokenizer, supported_vocab_size, tokenizer_from_bytes, train_tokenizer
from engine.data.vocab_growth import add_chat_tokens, expand_tokenizer, tokenization_drift, tokens_per_byte
from engine.data.windows import (
    TokenDataset,
    encode_documents,
    iter_windows,
    load_cached_tokens,
    remove_stale_caches,
    tokenize_source,
)
from engine.folder.model_folder import CHECKPOINT_FILE, WEIGHTS_FILE, ModelFolder, load_state, tokenizer_files
from engine.folder.records import EvalResult, RunRecord
from engine.model.config import ModelConfig
from engine.model.gpt import GPT
from engine.runtime import hardware
from engine.runtime.distributed import Distributed, SharedFile, first_line, rank_seed, state_on_cpu
from engine.training import budget
from engine.training.dataset_memory import DatasetMemory, balance_replayed_targets, dataset_id_of, mix_in_rehearsal
from engine.training.events import (
    Checkpointed,
    CompileChecked,
    CompileFailed,
    EpochEnded,
    EpochStarted,
    Evaluated,
    MemoryBackoff,
    Notice,
    OnEvent,
    RunEnded,
    RunResumed,
    RunStarted,
    StepDone,
    TokenizerTraining,
    Tokenizing,
    TrainResult,
    VocabGrowing,
    VocabGrowth,
    ignore_events,
)
from engine.training.runs import (
    TIME_LIMIT,
    BestWeights,
    Budget,
    BudgetClock,
    Progress,
    RunState,
    StopCheck,
    StopFlag,
    graceful_interrupts,
    micro_batches_for,
)

log = logging.getLogger(__name__)

GROWTH_SAMPLE_BYTES = 5_000_000  # text that vocabulary growth learns its merges from
MAX_BUDGET_MINUTES = 7 * 24 * 60


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
    seed: int = 1337
    max_minutes: float = 0.0  # 0: no time limit
    compile: bool = False  # torch.compile the training forward; eager if it is unavailable or fails

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


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for ``step`` (0-based) of a run: linear warm-up, then cosine decay."""
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: GPT, cfg: TrainConfig, runtime: hardware.Runtime) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95); weight decay on matrices and embeddings only.

    The fused kernel on CUDA and on the CPU: for the compact model's 5.3M parameters
    one update took 4.3 ms fused against 10.0 ms with PyTorch's CPU default (a loop
    over tensors) and 11.7 ms with ``foreach``, in one process, alternating; about 1%
    of a training step. Other devices keep the default.
    """
    kwargs: dict[str, Any] = {"fused": True} if runtime.device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                             betas=(0.9, 0.95), **kwargs)


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure of the device (CUDA, MPS) or of the CPU allocator."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def accumulate_gradients(model: GPT, x: torch.Tensor, y: torch.Tensor, runtime: hardware.Runtime,
                         micro_batches: int = 1, scaler: torch.amp.GradScaler | None = None,
                         segments: torch.Tensor | None = None, learned_total: int | None = None,
                         world_size: int = 1, no_sync: Callable[[], Any] | None = None) -> torch.Tensor:
    """Forward and backward over the batch (x, y) in ``micro_batches`` slices.

    Each slice's mean loss is weighted by its share of the learned targets (all of them
    for text; the replies in conversations), so the gradients add up to those of the
    whole batch at once: a smaller micro-batch changes memory use, not what is learned.
    Returns the batch's mean loss (a tensor; no device sync for a single slice).
    ``segments`` marks packed conversations (see ``GPT.forward``).

    In a distributed run ``model`` is the DistributedDataParallel wrapper, (x, y) this
    rank's share of the global batch, and ``learned_total`` the learned targets of the
    whole global batch. A slice's weight is then its share of those times ``world_size``,
    because DDP averages the ranks' gradients: the average is the whole batch's gradient.
    Gradients are exchanged once, in the last slice's backward (``no_sync`` around the
    others), and every rank runs every slice, even one with nothing to learn, so that all
    join each exchange. The result is this rank's part of the batch's mean loss; the
    parts of all ranks add up to it.
    """
    x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
    if segments is not None:
        segments = segments.to(runtime.device, non_blocking=True)
    if micro_batches == 1 and no_sync is None:
        with runtime.autocast():
            _, loss = model(x, y, segments=segments)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    learned = learned_total if learned_total is not None else int((y >= 0).sum())
    total = torch.zeros((), device=x.device)
    parts = list(zip(x.chunk(micro_batches), y.chunk(micro_batches),
                     segments.chunk(micro_batches) if segments is not None else [None] * micro_batches))
    for i, (xs, ys, ss) in enumerate(parts):
        share = int((ys >= 0).sum()) / max(1, learned)
        if share == 0 and no_sync is None:
            continue  # nothing to learn in this slice (its mean loss would be NaN)
        exchange = no_sync is None or i == len(parts) - 1
        with contextlib.nullcontext() if exchange else no_sync():
            with runtime.autocast():
                if share == 0:  # a zero gradient that still joins the exchange
                    logits, _ = model(xs, segments=ss)
                    part = logits.float().sum() * 0.0
                else:
                    _, loss = model(xs, ys, segments=ss)
                    part = loss * share
            weighted = part * world_size
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        total = total + part.detach()
    return total


def apply_update(model: GPT, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float,
                 scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip the accumulated gradients and take one optimizer step at learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def checked_loss(loss: torch.Tensor) -> float:
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError("the loss became NaN/inf; lower the learning rate and resume "
                                 "from the last checkpoint")
    return value


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
               runtime: hardware.Runtime, grad_clip: float,
               scaler: torch.amp.GradScaler | None = None, micro_batches: int = 1) -> float:
    """One optimizer step on the batch (x, y) at learning rate ``lr``; returns the loss.

    The whole training step, shared by ``Trainer`` and the benchmark (bench.py), so
    the benchmark times exactly what training runs.
    """
    loss = accumulate_gradients(model, x, y, runtime, micro_batches, scaler)
    apply_update(model, optimizer, lr, grad_clip, scaler)
    return checked_loss(loss)


def estimate_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, ...]], runtime: hardware.Runtime,
                  token_bytes: np.ndarray) -> EvalResult:
    """Validation loss (nats/token), perplexity and bits per byte; restores train mode.

    Bits per byte divide the total loss by the bytes of text the targets stand for,
    which makes models with different tokenizers comparable. Targets of -1 are not
    counted (in conversations, everything but the assistant's replies).
    """
    return eval_result(*validation_sums(model, batches, runtime, token_bytes))


def eval_result(total_nats: float, total_tokens: int, total_bytes: int) -> EvalResult:
    """The validation numbers from the sums ``validation_sums`` returns (added up over ranks)."""
    loss = total_nats / max(1, total_tokens)
    return EvalResult(val_loss=loss, perplexity=math.exp(min(loss, 50.0)),
                      bpb=total_nats / math.log(2) / max(1, total_bytes), val_tokens=total_tokens)


@torch.no_grad()
def validation_sums(model: GPT, batches: Iterable[tuple[torch.Tensor, ...]], runtime: hardware.Runtime,
                    token_bytes: np.ndarray) -> tuple[float, int, int]:
    """(nats, learned targets, bytes they stand for) summed over ``batches``; restores train mode."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    token_bytes_t = torch.from_numpy(token_bytes)
    try:
        for x, y, *segments in batches:  # conversations come with segments (see GPT.forward)
            segments = segments[0].to(runtime.device) if segments else None
            with runtime.autocast():
                logits, _ = model(x.to(runtime.device), segments=segments)
            nats = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                     y.to(runtime.device).reshape(-1), reduction="sum", ignore_index=-1)
            learned = y >= 0  # conversations learn only the assistant's ids; the rest is -1
            total_nats += nats.item()
            total_tokens += int(learned.sum())
            total_bytes += int(token_bytes_t[y[learned]].sum())
    finally:
        model.train(was_training)
    return total_nats, total_tokens, total_bytes


def _exclusive(method):
    """Run a Trainer method that writes the folder while holding its single-writer lock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.folder.writer_lock():
            return method(self, *args, **kwargs)
    return locked


@dataclass
class RunPackage:
    """What rank 0 sends the other ranks of a distributed run before it starts.

    All they need, so that they never open the model folder: the settings, the
    tokenizer, where the run stands, the optimizer's state, the data and the rehearsal
    sample. The weights travel separately: DistributedDataParallel copies rank 0's to
    every rank when it wraps the model.
    """

    model_config: dict
    train_config: dict
    tokenizer_kind: str
    tokenizer: bytes
    progress: dict  # Progress.to_dict(), the run included
    resumed: bool
    optimizer: dict  # its state_dict, on the CPU
    scaler: dict | None
    rng_ranks: list[dict] | None  # each rank's RNG state at the checkpoint (same world size only)
    data: SharedFile  # the token cache of the run
    rehearsal_pool: np.ndarray | None


class Trainer:
    """Builds or loads the model in ``model_dir`` and trains it.

    With ``distributed`` (a job torchrun started) this is rank 0: it alone reads and
    writes the folder, and sends each run to the other ranks, which train through
    ``Trainer.follow``.
    """

    def __init__(self, model_dir: str, tokenizer_kind: str | None = "bpe", model_overrides: dict | None = None,
                 train_overrides: dict | None = None, runtime: hardware.Runtime | None = None,
                 preset: str | None = None, distributed: Distributed | None = None) -> None:
        if distributed is not None and not distributed.is_main:
            raise ValueError("only rank 0 opens the model folder; the other ranks train through Trainer.follow")
        self.dist = distributed
        self.folder = ModelFolder(model_dir)
        self.folder.recover()
        self.runtime = runtime or (distributed.runtime if distributed else hardware.detect_runtime())
        self.model_overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
        self.train_overrides = {k: v for k, v in (train_overrides or {}).items() if v is not None}
        self.preset = preset
        self.notes: list[str] = []  # told to the user when training starts
        choice = self.folder.choose_tokenizer(tokenizer_kind or "bpe")
        self.tokenizer_kind = choice.kind
        if choice.note:
            self.notes.append(choice.note)
        self.meta = self.folder.read_meta() if choice.existing else None
        if choice.existing:
            arch = {k: v for k, v in self.model_overrides.items() if k != "dropout"}
            if arch or preset:
                self.notes.append("the model already exists, so its size settings are kept "
                                  "(use another --model-dir for a new model)")
        saved = dict(self.meta["training"]) if self.meta else {}
        self.config = TrainConfig.from_dict({**saved, **self.train_overrides})
        self.model: GPT | None = None
        self.tokenizer: BaseTokenizer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.progress = Progress()
        self.history: dict = {"steps": [], "evals": [], "runs": []}
        self.memory = DatasetMemory(self.folder)
        self.rehearsal_pool: np.ndarray | None = None  # earlier data replayed during training
        self._unsaved_files: dict[str, bytes] = {}
        self._compiled: Callable | None = None  # torch.compile's wrapper while it works
        self._ddp: torch.nn.Module | None = None  # the DistributedDataParallel wrapper during a distributed run
        self._saved_rng_ranks: list[dict] | None = None  # every rank's RNG state, from a distributed checkpoint
        self._stopping = StopCheck(StopFlag(), None)
        self._flop_rate: float | None = None  # training FLOP/s here, once a time budget has probed it

    @classmethod
    def follow(cls, distributed: Distributed, stop: StopFlag | None = None) -> TrainResult:
        """A rank > 0 of a distributed run: wait for the run rank 0 prepares, then train its
        share of every batch until rank 0's run ends. Reports nothing, writes nothing."""
        package: RunPackage = distributed.receive()
        trainer = object.__new__(cls)  # the folder-free constructor below, not __init__
        trainer._take_package(package, distributed)
        path = distributed.fetch_file(package.data)
        run = trainer.progress.run
        if run.kind == "chat":
            dataset = ChatDataset.load(path)
        else:
            dataset = TokenDataset(load_cached_tokens(path), trainer.model.config.context, trainer.config.val_fraction)
        return trainer._run_loop(dataset, run, ignore_events, stop or StopFlag(), package.resumed)

    def _take_package(self, package: RunPackage, distributed: Distributed) -> None:
        """Set up a rank > 0 from rank 0's package: the same model, optimizer and run, no folder."""
        self.dist, self.folder, self.runtime = distributed, None, distributed.runtime
        self.model_overrides, self.train_overrides, self.preset, self.notes = {}, {}, None, []
        self.tokenizer_kind, self.meta = package.tokenizer_kind, None
        self.tokenizer = tokenizer_from_bytes(package.tokenizer_kind, package.tokenizer, "rank 0's tokenizer")
        self.config = TrainConfig.from_dict(package.train_config)
        # Any weights do: DistributedDataParallel copies rank 0's into this model when it wraps it.
        self.model = GPT(ModelConfig.from_dict(package.model_config)).to(self.runtime.device)
        self._make_optimizer()
        self.optimizer.load_state_dict(package.optimizer)
        if self.scaler is not None and package.scaler:
            self.scaler.load_state_dict(package.scaler)
        self.progress = Progress.from_dict(package.progress)
        self.history = {"steps": [], "evals": [], "runs": []}
        self.memory = None  # what the model remembers of its data sets is rank 0's to keep
        self.rehearsal_pool = package.rehearsal_pool
        self._unsaved_files, self._compiled, self._ddp, self._saved_rng_ranks = {}, None, None, None
        self._stopping = StopCheck(StopFlag(), None)
        self._flop_rate: float | None = None  # training FLOP/s here, once a time budget has probed it
        if package.rng_ranks is not None:
            self._restore_rng(package.rng_ranks[distributed.rank])
        else:
            torch.manual_seed(rank_seed(self.config.seed, distributed.rank, self.progress.step))

    @property
    def writes_folder(self) -> bool:
        """Whether this process writes the model folder (rank 0 of a distributed run, or alone)."""
        return self.dist is None or self.dist.is_main

    # -- building and loading -------------------------------------------------------------
    @property
    def has_model(self) -> bool:
        return self.folder.has_model()

    def _new_model_config(self, vocab_size: int, plan: budget.BudgetPlan | None = None) -> ModelConfig:
        if self.preset:
            _, d_model, n_layer, n_head = hardware.preset_by_name(self.preset)
        else:
            _, d_model, n_layer, n_head = hardware.pick_preset(self.runtime)
        values = {"d_model": d_model, "n_layer": n_layer, "n_head": n_head}
        if plan is not None:
            shape = plan.shape
            values = {"d_model": shape.d_model, "n_layer": shape.n_layer, "n_head": shape.n_head,
                      "context": shape.context, "dropout": plan.dropout}
        return ModelConfig(vocab_size=vocab_size, **{**values, **self.model_overrides})

    def _pinned_shape(self) -> budget.Shape | None:
        """The shape the user chose (a preset or sizes), which a time budget keeps."""
        if not (self.preset or {"d_model", "n_layer", "n_head"} & set(self.model_overrides)):
            return None
        c = self._new_model_config(1)
        return budget.Shape(c.d_model, c.n_layer, c.n_head, c.context)

    def _plan_budget(self, source: Source, minutes: float, on_event: OnEvent) -> budget.BudgetPlan:
        """Tokenize now (the data's size is part of the plan), probe the machine, plan."""
        on_event(Tokenizing(source.name, source.n_bytes))
        self.folder.cache_dir.mkdir(parents=True, exist_ok=True)
        tokens = tokenize_source(source, self.tokenizer, self.folder.cache_dir)
        vocab = self.tokenizer.vocab_size
        context = self.model_overrides.get("context", ModelConfig(vocab_size=1).context)
        batch = self.config.batch_size or hardware.default_batch_size(self.runtime, 256, context)
        pinned = self._pinned_shape()  # probed itself: then the rate is that of the model that trains
        self._flop_rate = budget.probe_flop_rate(self.runtime, vocab, batch, pinned, budget.probe_seconds(minutes))
        plan = budget.plan_budget(minutes, self._flop_rate, int(len(tokens) * (1 - self.config.val_fraction)),
                                  vocab, batch, context, pinned)
        # What the user set wins over the plan, and the plan says so.
        plan = replace(plan, learning_rate=self.train_overrides.get("learning_rate", plan.learning_rate),
                       dropout=self.model_overrides.get("dropout", plan.dropout))
        self.config = replace(self.config, learning_rate=plan.learning_rate)
        on_event(Notice(plan.describe()))
        return plan

    def _tokens_per_s(self, batch_size: int, window: int, minutes: float) -> float:
        """What this model is expected to train per second here (the probe's rate, measured once)."""
        c = self.model.config
        shape = budget.Shape(c.d_model, c.n_layer, c.n_head, window)
        if self._flop_rate is None:
            self._flop_rate = budget.probe_flop_rate(self.runtime, c.vocab_size, batch_size, shape,
                                                     budget.probe_seconds(minutes))
        return self._flop_rate / shape.flops_per_token(c.vocab_size)

    def _create(self, source: Source, on_event: OnEvent, minutes: float = 0.0) -> None:
        """First training in an empty folder: tokenizer and model, in memory until the first save."""
        self.folder.check_writable()
        requested = self.config.target_vocab_size
        target = supported_vocab_size(requested, source.n_bytes)
        on_event(TokenizerTraining(self.tokenizer_kind, target))
        tok = train_tokenizer(self.tokenizer_kind, source.sample_for_tokenizer(), target)
        if tok.vocab_size < requested:
            # Said now, before training starts: it explains the model that follows.
            on_event(Notice(f"vocabulary lowered from {requested} to {tok.vocab_size}: "
                            f"{source.n_bytes:,} bytes of text cannot support more tokens"))
        self.tokenizer = tok
        plan = self._plan_budget(source, minutes, on_event) if minutes else None
        config = self._new_model_config(tok.vocab_size, plan)
        torch.manual_seed(self.config.seed)
        self.model = GPT(config).to(self.runtime.device)
        self.meta = {"tokenizer": tok.kind, "model": config.to_dict(), "training": self.config.to_dict(),
                     "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._make_optimizer()
        self.progress = Progress()
        self.history = {"steps": [], "evals": [], "runs": []}
        # Nothing is written yet: if the data turns out unusable, no half-made model is
        # left behind. The tokenizer joins the first save.
        self._unsaved_files = tokenizer_files(tok)

    def _make_optimizer(self) -> None:
        self.optimizer = make_optimizer(self.model, self.config, self.runtime)
        self.scaler = torch.amp.GradScaler("cuda") if self.runtime.use_grad_scaler else None

    def load(self) -> None:
        """Load model, tokenizer, optimizer and progress from the folder."""
        if self.model is not None:
            return
        self.meta = self.folder.read_meta()
        self.tokenizer = self.folder.load_tokenizer()
        config = ModelConfig.from_dict(self.meta["model"])
        if "dropout" in self.model_overrides:
            config.dropout = self.model_overrides["dropout"]
        if self.tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                             f"expects {config.vocab_size}; the folder is inconsistent")
        self.model = GPT(config)
        ckpt_path = self.folder.file(CHECKPOINT_FILE)
        ckpt = None
        if ckpt_path.exists():
            try:
                ckpt = self.folder.load_verified(CHECKPOINT_FILE)
                if not isinstance(ckpt, dict) or not {"model", "optimizer", "state"} <= set(ckpt):
                    raise ValueError(f"{ckpt_path} is not a training checkpoint")
            except ValueError as exc:
                self.notes.append(f"{exc}; continuing from model.pth with a fresh optimizer")
                ckpt = None
        if ckpt is not None:
            load_state(self.model, ckpt["model"], ckpt_path)
        else:  # weights without training state: continue with a fresh optimizer
            load_state(self.model, self.folder.load_verified(WEIGHTS_FILE), self.folder.file(WEIGHTS_FILE))
            if not ckpt_path.exists():
                self.notes.append("no checkpoint.pth found: training continues from model.pth "
                                  "with a fresh optimizer")
        self.model.to(self.runtime.device)
        self._make_optimizer()
        self.history = self.folder.read_history()
        self.memory = DatasetMemory(self.folder, self.folder.read_datasets())
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.progress = Progress.from_dict(ckpt["state"])
            self._restore_rng(ckpt.get("rng", {}))
            self._saved_rng_ranks = ckpt.get("rng_ranks")
            # Steps logged after this checkpoint were lost with the process; drop them.
            step = self.progress.step
            self.history["steps"] = [row for row in self.history["steps"] if row[0] <= step]
            self.history["evals"] = [e for e in self.history["evals"] if e["step"] <= step]
        else:
            self.progress = Progress()

    # -- checkpoints ---------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.dist is not None:  # a rank touches its own GPU only (every GPU, from every rank, costs memory)
            if self.runtime.device.type == "cuda":
                state["cuda_device"] = torch.cuda.get_rng_state(self.runtime.device)
        elif torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _restore_rng(self, state: dict) -> None:
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if not torch.cuda.is_available():
            return
        if self.dist is None:
            if "cuda" in state:
                torch.cuda.set_rng_state_all(state["cuda"])
            elif "cuda_device" in state:
                torch.cuda.set_rng_state(state["cuda_device"])
        elif self.runtime.device.type == "cuda":
            own = state.get("cuda_device")
            if own is None and self.runtime.device.index < len(state.get("cuda", [])):
                own = state["cuda"][self.runtime.device.index]
            if own is not None:
                torch.cuda.set_rng_state(own, self.runtime.device)

    def save_checkpoint(self, extra_files: dict[str, bytes] | None = None) -> None:
        """Save weights, full training state, history, data sets and config as one unit.

        After a crash the folder holds either this save or the previous one, never a
        mix (``extra_files`` join the same unit, e.g. a grown tokenizer).

        In a distributed run every rank calls it at the same step: rank 0 gathers each
        rank's RNG state (its dropout draws), so that a resume on as many ranks is exact,
        and writes; the others only hand over their state.
        """
        rng = self._rng_state()
        rng_ranks = self.dist.gather_to_main(rng) if self.dist is not None else None
        if not self.writes_folder:
            return
        # The plain model's state dict, never DDP's: its keys have no "module." prefix.
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        ckpt = {
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "state": self.progress.to_dict(),
            "rng": rng,
        }
        if rng_ranks is not None:
            ckpt["rng_ranks"] = rng_ranks
        self.meta["model"] = self.model.config.to_dict()
        self.meta["training"] = self.config.to_dict()
        self.meta["progress"] = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                                 "epochs_done": self.progress.epochs_done}
        self.folder.commit_save(weights, ckpt, self.meta, self.history, self.memory.records,
                                {**self._unsaved_files, **(extra_files or {})})
        self._unsaved_files = {}

    # -- queries ---------------------------------------------------------------------------
    def interrupted_run(self) -> RunState | None:
        """The unfinished run saved in the checkpoint, if any."""
        if self.model is None and not self.folder.file(CHECKPOINT_FILE).exists():
            return None
        self.load()
        run = self.progress.run
        return run if run and not run.finished else None

    def _tell_notes(self, on_event: OnEvent) -> None:
        for note in self.notes:
            on_event(Notice(note))
        self.notes.clear()

    # -- training ------------------------------------------------------------------------
    @_exclusive
    def train(self, source: Source, epochs: int, on_event: OnEvent = ignore_events,
              stop: StopFlag | None = None, minutes: float = 0.0) -> TrainResult:
        """Train on ``source`` for ``epochs``, or resume the interrupted run on it.

        ``minutes`` > 0 is a time budget instead: a new model gets the shape that learns
        most in that time here (``engine.training.budget``), and the run ends when the time is up,
        everything from tokenizing to the last evaluation included.
        """
        started = time.monotonic()
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 100_000:
            raise ValueError(f"epochs must be a whole number from 1 to 100000 (got {epochs!r})")
        if not (isinstance(minutes, (int, float)) and 0 <= minutes <= MAX_BUDGET_MINUTES):
            raise ValueError(f"the time budget must be from 0 to {MAX_BUDGET_MINUTES} minutes (got {minutes!r})")
        if self.model is None:
            if self.has_model:
                self.load()
            else:
                self._create(source, on_event, minutes)
        self._tell_notes(on_event)
        on_event(Tokenizing(source.name, source.n_bytes))
        self.folder.cache_dir.mkdir(parents=True, exist_ok=True)
        tokens = tokenize_source(source, self.tokenizer, self.folder.cache_dir)
        time_budget = Budget(minutes * 60, started) if minutes else None
        return self._train_tokens(tokens, source.name, epochs, on_event, stop, time_budget)

    @_exclusive
    def resume(self, on_event: OnEvent = ignore_events, stop: StopFlag | None = None) -> TrainResult:
        """Continue the interrupted run from its checkpoint, on its cached token ids."""
        run = self.interrupted_run()
        if run is None:
            raise ValueError("there is no interrupted run to resume")
        self._tell_notes(on_event)
        if run.kind == "chat":
            dataset = ChatDataset.load(self.folder.cache_dir / run.cache_file)
            return self._run_on(dataset, run.name, run.cache_file, run.epochs, "chat", on_event, stop)
        tokens = load_cached_tokens(self.folder.cache_dir / run.cache_file)
        return self._train_tokens(tokens, run.name, run.epochs, on_event, stop)

    def _train_tokens(self, tokens: np.ndarray, name: str, epochs: int, on_event: OnEvent,
                      stop: StopFlag | None, time_budget: Budget | None = None) -> TrainResult:
        context = self.model.config.context
        dataset = TokenDataset(tokens, context, self.config.val_fraction)
        if dataset.shortened:
            on_event(Notice(f"the text is short ({len(tokens)} tokens): training on windows of "
                            f"{dataset.window} tokens instead of {context}"))
        return self._run_on(dataset, name, Path(tokens.filename).name, epochs, "text", on_event, stop,
                            time_budget=time_budget)

    def _run_on(self, dataset: TokenDataset | ChatDataset, name: str, cache_file: str, epochs: int, kind: str,
                on_event: OnEvent, stop: StopFlag | None, held_out: list[list[Message]] | None = None,
                time_budget: Budget | None = None) -> TrainResult:
        """Resume the interrupted run on this data, or start a new one; then train.

        In a distributed run the batch is the global one (by default each process's usual
        batch, times the processes), and the schedule follows it as for one process.
        """
        world_size = self.dist.world_size if self.dist is not None else 1
        run = self.progress.run
        resumed = bool(run and not run.finished and run.cache_file == cache_file)
        if resumed:
            on_event(RunResumed(run.name, run.epoch, run.epochs, run.run_step, run.total_steps))
            self._check_batch_splits(dataset, run.batch_size, resumed)
            if run.world_size != world_size:
                on_event(Notice(f"this run was saved by {run.world_size} process(es) and goes on with {world_size}: "
                                f"the same step, data position and learning-rate schedule, each process taking "
                                f"{run.batch_size // world_size} of the {run.batch_size} sequences of a batch; "
                                "dropout draws differ from those of an uninterrupted run"))
                run.micro_batches = micro_batches_for(run, world_size)
                run.world_size = world_size
        else:
            batch_size = self.config.batch_size or world_size * hardware.default_batch_size(
                self.runtime, self.model.config.d_model, dataset.window)
            self._check_batch_splits(dataset, batch_size, resumed)
            steps_per_epoch = dataset.epoch_plan(self.config.seed, 0, batch_size).n_batches
            total_steps = epochs * steps_per_epoch
            if time_budget is not None:
                # A first guess from the probe; the loop re-plans it from the steps it times.
                total_steps = max(1, int(time_budget.seconds_left() * self._tokens_per_s(batch_size, dataset.window, time_budget.seconds / 60)
                                         / (batch_size * dataset.window)))
                epochs = min(100_000, 2 + 2 * total_steps // steps_per_epoch)  # the clock ends it, not these
            run = RunState(cache_file=cache_file, name=name, epochs=epochs, total_steps=total_steps,
                           batch_size=batch_size, window=dataset.window, start_step=self.progress.step, kind=kind,
                           world_size=world_size, budget_s=time_budget.seconds if time_budget else 0.0,
                           spent_s=time_budget.spent() if time_budget else 0.0)
            self.progress.run = run
            self.history["runs"].append(asdict(RunRecord(name, self.progress.step, epochs, dataset.n_train_tokens,
                                                         kind, run.budget_s / 60)))
            if kind == "chat":
                self.memory.register_conversations(name, cache_file, held_out or [])
            else:
                self.memory.register(self.tokenizer, dataset, name, cache_file)
        self.rehearsal_pool = (self.memory.rehearsal_pool(self.tokenizer, cache_file, self.model.config.context + 1)
                               if self.config.rehearsal > 0 else None)
        if self.dist is not None:
            self._send_run(run, resumed, self.folder.cache_dir / cache_file)
        return self._run_loop(dataset, run, on_event, stop or StopFlag(), resumed)

    def _check_batch_splits(self, dataset: TokenDataset | ChatDataset, batch_size: int, resumed: bool) -> None:
        """A distributed run splits every batch evenly over the processes, or refuses to start."""
        if self.dist is None:
            return
        world_size = self.dist.world_size
        rows = dataset.epoch_plan(self.config.seed, 0, batch_size).batch_size  # less when the data holds less
        if rows % world_size == 0:
            return
        fits = [n for n in range(1, rows + 1) if rows % n == 0]
        if rows < batch_size:
            raise ValueError(f"the data holds only {rows} windows, a batch of {rows} sequences, which {world_size} "
                             f"processes cannot share evenly; use more text or a number of processes from {fits}")
        if resumed:
            raise ValueError(f"this run's batch of {rows} sequences cannot be split evenly over {world_size} "
                             f"processes; resume it with a number of processes from {fits}")
        raise ValueError(f"a batch of {rows} sequences cannot be split evenly over {world_size} processes; use a "
                         f"--batch-size that is a multiple of {world_size} (e.g. {world_size * max(1, rows // world_size)})")

    def _send_run(self, run: RunState, resumed: bool, data: Path) -> None:
        """Rank 0: send the other ranks everything the run needs, then share the data file."""
        world_size = self.dist.world_size
        rng_ranks = self._saved_rng_ranks if resumed and len(self._saved_rng_ranks or []) == world_size else None
        package = RunPackage(
            model_config=self.model.config.to_dict(), train_config=self.config.to_dict(),
            tokenizer_kind=self.tokenizer.kind, tokenizer=self.tokenizer.to_bytes(),
            progress=self.progress.to_dict(), resumed=resumed, optimizer=state_on_cpu(self.optimizer.state_dict()),
            scaler=self.scaler.state_dict() if self.scaler is not None else None, rng_ranks=rng_ranks,
            data=SharedFile.of(data), rehearsal_pool=self.rehearsal_pool)
        self.dist.announce(package)
        self.dist.fetch_file(package.data)

    @_exclusive
    def train_conversations(self, source: ConversationSource, epochs: int, on_event: OnEvent = ignore_events,
                            stop: StopFlag | None = None) -> TrainResult:
        """Fine-tune on conversations: the loss is on the assistant's replies only.

        A model made before the chat tokens existed gets them first (one journaled save).
        Rehearsal of earlier text stays on, so the model keeps what it knew.
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 100_000:
            raise ValueError(f"epochs must be a whole number from 1 to 100000 (got {epochs!r})")
        if not self.has_model:
            raise ValueError("there is no model to fine-tune yet: train it on text first (Training Menu 1), "
                             "then on conversations")
        self.load()
        self._tell_notes(on_event)
        chat_ids = self.tokenizer.chat_token_ids()
        if chat_ids is None:
            chat_ids = self.add_chat_tokens()
            on_event(Notice(f"added the chat tokens to this older model (vocabulary now {self.tokenizer.vocab_size:,})"))
        on_event(Tokenizing(source.name, source.n_bytes))
        context = self.model.config.context
        cache_file = f"{source.content_hash()[:20]}-{self.tokenizer.fingerprint()}.ctx{context}.chat.npz"
        path = self.folder.cache_dir / cache_file
        self.folder.cache_dir.mkdir(parents=True, exist_ok=True)
        train, held_out = split_conversations(source.conversations, self.config.seed)
        if held_out is train:
            on_event(Notice(f"only {len(train)} conversation(s): all are trained on, so the held-out loss is "
                            "measured on them too"))
        if path.exists():
            dataset = ChatDataset.load(path)
        else:
            dataset = ChatDataset.build(self.tokenizer, chat_ids, train, held_out, context)
            dataset.save(path)
        self.meta["chat_tuned"] = True  # saved with the run's first checkpoint
        return self._run_on(dataset, source.name, cache_file, epochs, "chat", on_event, stop, held_out)

    def _run_loop(self, dataset: TokenDataset, run: RunState, on_event: OnEvent, stop: StopFlag,
                  resumed: bool) -> TrainResult:
        """Train ``run`` to its end or to a stop; the same loop on every rank of a distributed run.

        Every rank builds the same global batch and trains its own rows of it (``_step``),
        so no window is trained twice in an epoch and the schedule is that of one process.
        """
        cfg, model, rt, progress = self.config, self.model, self.runtime, self.progress
        token_bytes = self.tokenizer.token_bytes()
        model.train()
        self._compiled = None
        self._ddp = self.dist.wrap(model) if self.dist is not None else None
        if cfg.compile:
            self._compiled, note = hardware.compile_model(model if self._ddp is None else self._ddp)
            on_event(CompileChecked(self._compiled is not None, note))
        steps_here = 0
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
        clock = BudgetClock(run, replan=self.dist is None) if run.budget_s else None
        eval_batches = (dataset.val_batch_count(run.batch_size, cfg.eval_batches)  # what the final evaluation runs
                        if clock is not None else 0)
        if clock is not None:
            deadline = min(deadline or math.inf, clock.deadline)
        self._stopping = StopCheck(stop, deadline, agreed_by_ranks=self.dist is not None)
        memory_checked = self.dist is None  # a distributed run first finds a micro-batch every rank holds
        final_eval = None
        best = BestWeights() if clock is not None else None
        on_event(RunStarted(resumed=resumed, params=model.num_params(), train_tokens=dataset.n_train_tokens,
                            device=str(rt.device), precision=rt.precision, epochs=run.epochs,
                            batch_size=run.batch_size, window=run.window, micro_batches=run.micro_batches,
                            world_size=run.world_size,
                            minutes_left=(clock.deadline - clock.session_start) / 60 if clock else 0.0))
        with graceful_interrupts(stop):
            while run.epoch < run.epochs:
                plan = dataset.epoch_plan(cfg.seed, run.epoch, run.batch_size)
                on_event(EpochStarted(run.epoch, 0 if clock else run.epochs, plan.n_batches, run.batch))
                while run.batch < plan.n_batches:
                    if self._stopping.reason():
                        break
                    t0 = time.perf_counter()
                    x, y, *segments = dataset.train_batch(plan, run.batch)
                    segments = segments[0] if segments else None  # packed conversations
                    if self.rehearsal_pool is not None:
                        replayed = mix_in_rehearsal(x, y, self.rehearsal_pool, cfg.rehearsal,
                                                    (cfg.seed, run.epoch, run.batch))
                        if segments is not None and replayed:
                            segments[-replayed:] = 0  # a replayed text row is one plain window
                            balance_replayed_targets(y, replayed, cfg.rehearsal, (cfg.seed, run.epoch, run.batch))
                    if not memory_checked:
                        self._agree_on_micro_batches(x, y, segments, run, on_event)
                        memory_checked = True
                    lr = lr_at(run.run_step, run.total_steps, cfg)
                    loss = self._step(x, y, lr, run, on_event, segments)
                    dt = time.perf_counter() - t0
                    if clock is not None:
                        self._stopping.deadline = clock.after_step(run, eval_batches, deadline, plan.n_batches)
                    run.batch += 1
                    run.run_step += 1
                    progress.step += 1
                    progress.tokens_seen += x.numel()
                    steps_here += 1
                    self.history["steps"].append([progress.step, round(loss, 5), lr])
                    # x is the global batch: in a distributed run this is the whole job's tokens/s
                    on_event(StepDone(progress.step, loss, lr, x.numel() / dt, run.batch, plan.n_batches))
                    if progress.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                        on_event(Checkpointed(progress.step))
                if self._stopping.reason():
                    break
                run.epoch += 1
                run.batch = 0
                progress.epochs_done += 1
                final_eval = self._evaluate(dataset, token_bytes, run)
                on_event(Evaluated(final_eval))
                if best is not None:
                    best.offer(model, final_eval)
                self.save_checkpoint()
                on_event(EpochEnded(run.epoch, run.epochs))
            stopped = self._stopping.reason()
            if stopped and stopped != TIME_LIMIT:
                pass  # asked to stop: save where it stands
            elif clock is not None:  # the budget is spent (or the data ran out first): done
                stopped = ""
                if steps_here == 0:
                    on_event(Notice(f"the time budget was spent before the first step ({clock.spent():.0f} s "
                                    "went to reading and tokenizing the data); give it more minutes"))
                run.finished = True
                if final_eval is None or final_eval.step != progress.step:  # not just evaluated at a pass's end
                    final_eval = self._evaluate(dataset, token_bytes, run, partial_epoch=run.batch > 0)
                    on_event(Evaluated(final_eval))
                if best is not None and best.beats(final_eval):
                    best.restore(model)
                    on_event(Notice(f"kept the weights of pass {best.result.epoch} (held-out {best.result.bpb:.4f} "
                                    f"bits/byte, against {final_eval.bpb:.4f} at the end): later passes over this "
                                    "text overfit it"))
                    final_eval = self._record_eval(replace(best.result, step=progress.step, epoch=run.epoch,
                                                           partial_epoch=run.batch > 0), run)
                run.spent_s = clock.spent()
            elif run.epoch < run.epochs:
                stopped = TIME_LIMIT
                final_eval = self._evaluate(dataset, token_bytes, run, partial_epoch=True)
                on_event(Evaluated(final_eval))
            else:
                run.finished = True
            self.save_checkpoint()
        self._ddp = self._compiled = None
        on_event(RunEnded(stopped, progress.step))
        return TrainResult(steps_here, progress.step, stopped, final_eval, resumed)

    def _step(self, x: torch.Tensor, y: torch.Tensor, lr: float, run: RunState, on_event: OnEvent,
              segments: torch.Tensor | None = None) -> float:
        """One optimizer step, with two fallbacks that retry the same step.

        Out of memory in the forward or backward pass: the micro-batch is halved. The
        batch, learning-rate schedule and data position are unchanged, so nothing is lost.
        A failure of the compiled model (``TrainConfig.compile``): training goes on eagerly.

        In a distributed run (x, y) is the global batch; this rank trains its rows of it,
        and one all-reduce after the backward pass adds up the loss and tells every rank
        whether any was asked to stop (``StopCheck``). Running out of memory there is an
        error: the other ranks would wait for this one in the gradient exchange, which is
        why ``_agree_on_micro_batches`` finds a size that fits before the first step.
        """
        while True:
            micro = run.micro_batches
            forward = self._training_forward()
            try:
                loss = self._accumulate(forward, x, y, micro, segments)
                break
            except Exception as error:
                oom = is_out_of_memory(error)
                if not oom and self._compiled is None:
                    raise
                lines = str(error).strip().splitlines()
                reason = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
            # Handled outside the except block, so that the exception's traceback, which
            # holds the activations of the failed pass, is freed first.
            self.optimizer.zero_grad(set_to_none=True)  # drop any partial gradients
            self._release_memory()
            if not oom:
                self._compiled = None
                on_event(CompileFailed(reason))
                continue
            if self.dist is not None:
                raise MemoryError(f"rank {self.dist.rank} ran out of memory ({self.runtime.device}) at step "
                                  f"{self.progress.step + 1} although the first step fitted; the last checkpoint is "
                                  "intact: run the same command to go on from it, or start a new run with a "
                                  "smaller --batch-size")
            if micro >= x.shape[0]:
                raise MemoryError(f"out of memory even with one sequence per micro-batch; use a smaller "
                                  f"model or context (the last checkpoint, step {self.progress.step}, "
                                  f"is intact)")
            run.micro_batches = min(2 * micro, x.shape[0])
            rows = -(-x.shape[0] // run.micro_batches)
            on_event(MemoryBackoff(run.micro_batches, rows, x.shape[0]))
        if self.dist is not None:
            loss = self._agree_after_step(loss)
        apply_update(self.model, self.optimizer, lr, self.config.grad_clip, self.scaler)
        return checked_loss(loss)

    def _training_forward(self) -> Callable:
        """What the step calls: the compiled model while it works, else DDP's wrapper or the model."""
        if self._compiled is not None:
            return self._compiled
        return self.model if self._ddp is None else self._ddp

    def _accumulate(self, forward: Callable, x: torch.Tensor, y: torch.Tensor, micro: int,
                    segments: torch.Tensor | None) -> torch.Tensor:
        """Gradients of the batch (x, y); in a distributed run of this rank's rows of it."""
        if self.dist is None:
            return accumulate_gradients(forward, x, y, self.runtime, micro, self.scaler, segments)
        rows = self.dist.shard(x.shape[0])
        return accumulate_gradients(forward, x[rows], y[rows], self.runtime, micro, self.scaler,
                                    None if segments is None else segments[rows], learned_total=int((y >= 0).sum()),
                                    world_size=self.dist.world_size, no_sync=self._ddp.no_sync)

    def _agree_after_step(self, loss_part: torch.Tensor) -> torch.Tensor:
        """One all-reduce: the batch's mean loss from every rank's part, and whether any rank stops."""
        votes = torch.tensor(self._stopping.votes(), device=self.runtime.device)
        summed = self.dist.all_reduce_sum(torch.cat([loss_part.float().reshape(1), votes]))
        self._stopping.agree(summed[1:].tolist())
        return summed[0]

    def _agree_on_micro_batches(self, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None,
                                run: RunState, on_event: OnEvent) -> None:
        """Before a distributed run's first step: find a micro-batch that every rank holds.

        Inside a step an out-of-memory error cannot be retried: the other ranks would wait
        for this one in the gradient exchange. So each rank first runs the step's forward and
        backward passes without exchanging anything (DDP's ``no_sync``), halves its
        micro-batch on its own when it runs out of memory, and all take the smallest slice
        any rank needed. Every later step has the same shapes. The gradients are dropped and
        the random state restored, so this trial changes nothing that follows.
        """
        rows = self.dist.shard(x.shape[0])
        n_rows = rows.stop - rows.start
        rng = self._rng_state()
        while True:
            micro, fits, compile_failure = run.micro_batches, True, ""
            try:
                with self._ddp.no_sync():
                    accumulate_gradients(self._training_forward(), x[rows], y[rows], self.runtime, micro, self.scaler,
                                         None if segments is None else segments[rows])
            except Exception as error:
                if is_out_of_memory(error):
                    fits = False
                elif self._compiled is not None:
                    compile_failure = f"{type(error).__name__}: {first_line(error)}"
                else:
                    raise
            self.optimizer.zero_grad(set_to_none=True)
            self._release_memory()
            if compile_failure:  # torch.compile fails alike on every rank: eager from here
                self._compiled = None
                on_event(CompileFailed(compile_failure))
                continue
            wanted = micro if fits else min(2 * micro, n_rows) if micro < n_rows else n_rows + 1  # +1: nothing fits
            agreed = int(self.dist.all_reduce_max(torch.tensor([float(wanted)], device=self.runtime.device)).item())
            if agreed > n_rows:
                raise MemoryError(f"out of memory on a rank even with one sequence per micro-batch; use a smaller "
                                  f"model or context, or more processes (the last checkpoint, step "
                                  f"{self.progress.step}, is intact)")
            if agreed == micro:
                break
            run.micro_batches = agreed
            on_event(MemoryBackoff(agreed, -(-n_rows // agreed), x.shape[0]))
        self._restore_rng(rng)

    def _release_memory(self) -> None:
        gc.collect()
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()

    def _evaluate(self, dataset: TokenDataset, token_bytes: np.ndarray, run: RunState,
                  partial_epoch: bool = False) -> EvalResult:
        # After an out-of-memory back-off, evaluate in micro-batches too: the same windows.
        # A distributed run evaluates those windows too, each rank a share of the batches,
        # and adds up the sums: the result is the one process's, reached W times faster.
        micro, world_size = run.micro_batches, run.world_size
        batches = dataset.val_batches(-(-(run.batch_size // world_size) // micro),
                                      self.config.eval_batches * micro * world_size)
        if self.dist is None:
            result = estimate_loss(self.model, batches, self.runtime, token_bytes)
        else:
            mine = itertools.islice(batches, self.dist.rank, None, world_size)
            sums = torch.tensor(validation_sums(self.model, mine, self.runtime, token_bytes), dtype=torch.float64,
                                device=self.runtime.device)
            total_nats, total_tokens, total_bytes = self.dist.all_reduce_sum(sums).tolist()
            result = eval_result(total_nats, int(total_tokens), int(total_bytes))
        return self._record_eval(replace(result, step=self.progress.step, epoch=run.epoch, dataset=run.name,
                                         partial_epoch=partial_epoch), run)

    def _record_eval(self, result: EvalResult, run: RunState) -> EvalResult:
        """The folder's record of the latest evaluation: what Training Status and Continue read."""
        if self.writes_folder:
            self.memory.note_latest(dataset_id_of(run.cache_file), result)
        self.history["evals"].append(result.to_dict())
        return result

    # -- what continual learning builds on ------------------------------------------------
    def evaluate_datasets(self) -> dict[str, EvalResult]:
        """Validation results on the held-out text of every data set seen, by name."""
        self.load()
        token_bytes = self.tokenizer.token_bytes()
        results = {}
        for record, docs in self.memory.held_out_texts():
            tokens = encode_documents(self.tokenizer, docs)
            if len(tokens) < 2:
                continue
            batches = iter_windows(tokens, self.model.config.context, 8, self.config.eval_batches)
            results[record.name] = estimate_loss(self.model, batches, self.runtime, token_bytes)
        chat_ids = self.tokenizer.chat_token_ids()
        for record, conversations in self.memory.held_out_conversations():
            held_out = ChatDataset.build(self.tokenizer, chat_ids, [], conversations, self.model.config.context)
            batches = held_out.val_batches(8, self.config.eval_batches)
            results[record.name] = estimate_loss(self.model, batches, self.runtime, token_bytes)
        return results

    @_exclusive
    def remember_results(self, results: dict[str, EvalResult]) -> None:
        """Make ``results`` (from ``evaluate_datasets``) each data set's latest, and save."""
        for record in self.memory.records:
            if record.name in results:
                self.memory.note_latest(record.id, results[record.name])
        self.save_checkpoint()

    def held_out_documents(self) -> list[str]:
        """Every data set's held-out documents together (to measure tokenization drift)."""
        return [doc for _, docs in self.memory.held_out_texts() for doc in docs]

    @_exclusive
    def grow_vocabulary(self, texts: list[str], max_new_tokens: int = 1000,
                        on_event: OnEvent = ignore_events) -> VocabGrowth:
        """Grow tokenizer, embedding rows and optimizer moments together; one journaled save.

        Every old id keeps its row exactly; each new row starts as the mean of the rows
        of the old tokens it is made of, with zero optimizer moments.
        """
        self.load()
        old_tok = self.tokenizer
        sample, size = [], 0
        for text in texts:  # learning merges needs a representative sample, not every byte
            sample.append(text[:GROWTH_SAMPLE_BYTES - size])
            size += len(sample[-1])
            if size >= GROWTH_SAMPLE_BYTES:
                break
        on_event(VocabGrowing(old_tok.kind, max_new_tokens))
        expansion = expand_tokenizer(old_tok, sample, max_new_tokens)
        if expansion.n_added == 0:
            return VocabGrowth(0, [], old_tok.vocab_size, old_tok.vocab_size)
        new_tok = expansion.tokenizer
        old_val = self.held_out_documents()
        growth = VocabGrowth(expansion.n_added, expansion.added[:12], old_tok.vocab_size, new_tok.vocab_size,
                             tokens_per_byte_before=tokens_per_byte(old_tok, sample),
                             tokens_per_byte_after=tokens_per_byte(new_tok, sample),
                             drift=tokenization_drift(old_tok, new_tok, old_val) if old_val else 0.0)
        with torch.no_grad():
            emb = self.model.wte.weight
            rows = torch.stack([emb[ids].mean(dim=0) if ids else emb.mean(dim=0) for ids in expansion.parts])
        self._adopt_tokenizer(new_tok, rows)
        return growth

    @_exclusive
    def add_chat_tokens(self) -> ChatTokenIds:
        """Give an older model the reserved chat tokens (appended; every old id unchanged).

        Their rows start sensibly: the role tokens as the mean embedding (no word in
        particular), <|end|> as a copy of end-of-text, the end the model already knows.
        """
        self.load()
        new_tok = add_chat_tokens(self.tokenizer)
        chat_ids = new_tok.chat_token_ids()
        with torch.no_grad():
            emb = self.model.wte.weight
            mean, eot = emb.mean(dim=0), emb[self.tokenizer.eot_id]
            rows = torch.stack([eot.clone() if i == chat_ids.end else mean.clone()
                                for i in range(self.tokenizer.vocab_size, new_tok.vocab_size)])
        self._adopt_tokenizer(new_tok, rows)
        return chat_ids

    def _adopt_tokenizer(self, new_tok: BaseTokenizer, new_rows: torch.Tensor) -> None:
        """Switch to a grown tokenizer: embedding rows, optimizer moments and one journaled save."""
        old_param, old_rows = self.model.wte.weight, self.model.wte.weight.shape[0]
        self.model.resize_vocab(new_tok.vocab_size, new_rows)
        self._grow_optimizer(old_param, old_rows)
        self.tokenizer = new_tok
        if self.progress.run and not self.progress.run.finished:
            self.progress.run.finished = True  # its token cache used the old vocabulary
        self.history.setdefault("expansions", []).append(
            {"step": self.progress.step, "added": new_tok.vocab_size - old_rows, "new_vocab": new_tok.vocab_size})
        self.save_checkpoint(tokenizer_files(new_tok))
        remove_stale_caches(self.folder.cache_dir, new_tok)

    def _grow_optimizer(self, old_param: torch.Tensor, old_rows: int) -> None:
        """Give the optimizer's moment tensors rows for the new tokens (zeros), keep the rest."""
        state = self.optimizer.state_dict()
        flat = [p for g in self.optimizer.param_groups for p in g["params"]]
        index = next(i for i, p in enumerate(flat) if p is old_param)
        slot = state["state"].get(index)
        new_rows = self.model.wte.weight.shape[0] - old_rows
        if slot:
            for key in ("exp_avg", "exp_avg_sq"):
                t = slot[key]
                slot[key] = torch.cat([t, torch.zeros(new_rows, *t.shape[1:], dtype=t.dtype, device=t.device)])
        scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        self._make_optimizer()
        self.optimizer.load_state_dict(state)
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
