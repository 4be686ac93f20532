"""The ``Trainer``: one model folder, trained on text or conversations, resumed exactly.

``train(source, epochs)`` either starts a new run on that data or, when the folder holds
an interrupted run on the same data, resumes it exactly: same data order, same
learning-rate schedule, same RNG state. Progress is reported through a callback, so
the interface decides the wording.

The Trainer is a façade over the parts of a run, each in its own module:
``planning`` (a new model's shape, a time budget's plan, a new run's schedule),
``checkpoint`` (the training state, saved to the folder or sent to other ranks),
``loop`` (the epochs, which ask ``step`` and ``evaluation``), and the folder's
records. It wires them, holds the folder's single-writer lock, and keeps what the
callers use: ``model``, ``tokenizer``, ``progress``, ``config``, ``history``, ``memory``.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch

from engine.data.chat_format import ChatTokenIds, Message
from engine.data.chat_windows import ChatDataset
from engine.data.conversations import ConversationSource
from engine.data.sources import Source
from engine.data.tokenizer import BaseTokenizer
from engine.data.vocab_growth import add_chat_tokens
from engine.data.windows import TokenDataset, load_cached_tokens, remove_stale_caches, tokenize_source
from engine.folder.model_folder import CHECKPOINT_FILE, ModelFolder, tokenizer_files
from engine.folder.records import EvalResult, FolderMeta, History, RunKind, RunRecord
from engine.model.gpt import GPT
from engine.runtime import hardware
from engine.runtime.distributed import Distributed
from engine.training import config as training_config
from engine.training.checkpoint import Checkpointer, TrainingState
from engine.training.config import TrainConfig, check_epochs, check_minutes
from engine.training.dataset_memory import DatasetMemory
from engine.training.evaluation import evaluate_held_out
from engine.training.events import (
    Notice,
    OnEvent,
    RunResumed,
    Tokenizing,
    TrainResult,
    VocabGrowing,
    VocabGrowth,
    ignore_events,
)
from engine.training.loop import TrainingLoop, follow_run
from engine.training.planning import (
    Planner,
    check_batch_splits,
    conversation_data,
    grow_tokenizer,
    new_tokenizer,
    rejoin,
    text_data,
)
from engine.training.runs import Budget, Clock, Progress, RunState, StopFlag


def _exclusive(method):
    """Run a Trainer method that writes the folder while holding its single-writer lock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.folder.writer_lock():
            return method(self, *args, **kwargs)
    return locked


class Trainer:
    """Builds or loads the model in ``model_dir`` and trains it.

    With ``distributed`` (a job torchrun started) this is rank 0: it alone reads and
    writes the folder, and sends each run to the other ranks, which train through
    ``Trainer.follow``. ``clock`` is what time budgets and time limits read
    (``time.monotonic``; a test passes a clock it moves itself).
    """

    def __init__(self, model_dir: str, tokenizer_kind: str | None = "bpe", model_overrides: dict | None = None,
                 train_overrides: dict | None = None, runtime: hardware.Runtime | None = None,
                 preset: str | None = None, distributed: Distributed | None = None,
                 clock: Clock = time.monotonic) -> None:
        if distributed is not None and not distributed.is_main:
            raise ValueError("only rank 0 opens the model folder; the other ranks train through Trainer.follow")
        self.dist = distributed
        self.folder = ModelFolder(model_dir)
        self.folder.recover()
        self.runtime = runtime or (distributed.runtime if distributed else hardware.detect_runtime())
        self.model_overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
        self.train_overrides = {k: v for k, v in (train_overrides or {}).items() if v is not None}
        self.preset = preset
        self.clock = clock
        self.notes: list[str] = []  # told to the user when training starts
        choice = self.folder.choose_tokenizer(tokenizer_kind or "bpe")
        self.tokenizer_kind = choice.kind
        if choice.note:
            self.notes.append(choice.note)
        self.meta: FolderMeta | None = self.folder.read_meta() if choice.existing else None
        if choice.existing:
            arch = {k: v for k, v in self.model_overrides.items() if k != "dropout"}
            if arch or preset:
                self.notes.append("the model already exists, so its size settings are kept "
                                  "(use another --model-dir for a new model)")
        saved = dict(self.meta.training) if self.meta else {}
        if saved and self.train_overrides.get("optimizer", saved["optimizer"]) != saved["optimizer"]:
            # Its optimizer state is that optimizer's: another could not take it over.
            self.notes.append(f"the model keeps the {saved['optimizer']} optimizer it was trained with "
                              "(use another --model-dir for a new model)")
            del self.train_overrides["optimizer"]
        # A new model starts from the recipe (``config.NEW_MODEL_RECIPE``), an existing one from
        # what its folder saved (an old folder reads as gpt2 + AdamW: ``records._upgrade_meta``).
        base = saved if self.meta else training_config.NEW_MODEL_RECIPE.train_settings(self.train_overrides)
        self.config = TrainConfig.from_dict({**base, **self.train_overrides})
        self.state: TrainingState | None = None  # the model and what trains it, once built or loaded
        self.tokenizer: BaseTokenizer | None = None
        self.memory = DatasetMemory(self.folder)
        self.rehearsal_pool: np.ndarray | None = None  # earlier data replayed during training
        self.planner = Planner(self.runtime, preset, self.model_overrides, self.train_overrides,
                               world_size=distributed.world_size if distributed else 1,
                               recipe=training_config.NEW_MODEL_RECIPE)
        self.checkpointer = Checkpointer(self.folder, self.runtime, distributed)

    @classmethod
    def follow(cls, distributed: Distributed, stop: StopFlag | None = None,
               clock: Clock = time.monotonic) -> TrainResult:
        """A rank > 0 of a distributed run: wait for the run rank 0 prepares, then train its
        share of every batch until rank 0's run ends. Reports nothing, writes nothing."""
        return follow_run(distributed, stop or StopFlag(), clock)

    # -- what callers read -----------------------------------------------------------------
    @property
    def model(self) -> GPT | None:
        return self.state.model if self.state else None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.state.optimizer if self.state else None

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.state.scaler if self.state else None

    @property
    def progress(self) -> Progress:
        return self.state.progress if self.state else Progress()

    @property
    def history(self) -> History:
        return self.state.history if self.state else History()

    @property
    def has_model(self) -> bool:
        return self.folder.has_model()

    # -- building and loading -------------------------------------------------------------
    def _create_model(self, data_tokens: int, minutes: float, on_event: OnEvent) -> None:
        """The new model, planned for a time budget when there is one (its data's size is part of the plan).

        Nothing is written yet: if the data turns out unusable, no half-made model is left
        behind. The tokenizer joins the first save.
        """
        tok = self.tokenizer
        config, self.config = self.planner.new_model(tok.vocab_size, data_tokens, minutes, self.config, on_event)
        self.state = TrainingState.new(config, self.config, self.runtime)
        self.meta = FolderMeta(tokenizer=tok.kind, model=config, training=self.config.to_dict(),
                               created=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.checkpointer.pending_files = tokenizer_files(tok)

    def load(self) -> None:
        """Load model, tokenizer, optimizer and progress from the folder."""
        if self.state is not None:
            return
        loaded = self.checkpointer.load(self.config, self.model_overrides.get("dropout"))
        self.state, self.meta, self.tokenizer = loaded.state, loaded.meta, loaded.tokenizer
        self.notes.extend(loaded.notes)
        self.memory = DatasetMemory(self.folder, self.folder.read_datasets())

    def save_checkpoint(self, extra_files: dict[str, bytes] | None = None) -> None:
        """Save weights, full training state, history, data sets and config as one unit
        (see ``Checkpointer.save``); ``extra_files`` join it, e.g. a grown tokenizer."""
        self.checkpointer.save(self.state, self.config, self.meta, self.memory.records, extra_files)

    # -- queries ---------------------------------------------------------------------------
    def interrupted_run(self) -> RunState | None:
        """The unfinished run saved in the checkpoint, if any."""
        if self.state is None and not self.folder.file(CHECKPOINT_FILE).exists():
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
        most in that time here (``engine.training.budget``), and the vocabulary that shape
        carries unless the user gave one, and the run ends when the time is up,
        everything from tokenizing to the last evaluation included.
        """
        started = self.clock()
        check_epochs(epochs)
        check_minutes(minutes)
        new = self.state is None and not self.has_model
        if new:  # first training in an empty folder: the tokenizer stays in memory until the first save
            self.folder.check_writable()
            vocab_size = self.planner.budget_vocabulary(minutes, source.n_bytes, self.config)
            self.tokenizer = new_tokenizer(self.tokenizer_kind, source, self.config.target_vocab_size, on_event,
                                           vocab_size)
        else:
            self.load()
        self._tell_notes(on_event)
        on_event(Tokenizing(source.name, source.n_bytes))  # once: a time budget's plan needs the data's size too
        self.folder.cache_dir.mkdir(parents=True, exist_ok=True)
        tokens = tokenize_source(source, self.tokenizer, self.folder.cache_dir)
        if new:
            self._create_model(len(tokens), minutes, on_event)
        time_budget = Budget(minutes * 60, started, self.clock) if minutes else None
        return self._train_tokens(tokens, source.name, epochs, on_event, stop, time_budget)

    @_exclusive
    def resume(self, on_event: OnEvent = ignore_events, stop: StopFlag | None = None) -> TrainResult:
        """Continue the interrupted run from its checkpoint, on its cached token ids."""
        run = self.interrupted_run()
        if run is None:
            raise ValueError("there is no interrupted run to resume")
        self._tell_notes(on_event)
        path = self.folder.cache_dir / run.cache_file
        if run.kind is RunKind.CHAT:
            return self._run_on(ChatDataset.load(path), run.name, run.cache_file, run.epochs, run.kind, on_event, stop)
        return self._train_tokens(load_cached_tokens(path), run.name, run.epochs, on_event, stop)

    def _train_tokens(self, tokens: np.ndarray, name: str, epochs: int, on_event: OnEvent,
                      stop: StopFlag | None, time_budget: Budget | None = None) -> TrainResult:
        dataset = text_data(tokens, self.model.config.context, self.config.val_fraction, on_event)
        return self._run_on(dataset, name, Path(tokens.filename).name, epochs, RunKind.TEXT, on_event, stop,
                            time_budget=time_budget)

    def _run_on(self, dataset: TokenDataset | ChatDataset, name: str, cache_file: str, epochs: int, kind: RunKind,
                on_event: OnEvent, stop: StopFlag | None, held_out: list[list[Message]] | None = None,
                time_budget: Budget | None = None) -> TrainResult:
        """Resume the interrupted run on this data, or start a new one; then train."""
        world_size = self.dist.world_size if self.dist is not None else 1
        run = self.progress.run
        resumed = bool(run and not run.finished and run.cache_file == cache_file)
        if resumed:
            on_event(RunResumed(run.name, run.epoch, run.epochs, run.run_step, run.total_steps))
            check_batch_splits(dataset, run.batch_size, self.config.seed, world_size, resumed=True)
            rejoin(run, world_size, on_event)
        else:
            run = self._start_run(dataset, name, cache_file, epochs, kind, held_out, time_budget)
        self.rehearsal_pool = (self.memory.rehearsal_pool(self.tokenizer, cache_file, self.model.config.context + 1)
                               if self.config.rehearsal > 0 else None)
        if self.dist is not None:
            self.checkpointer.send(self.state, self.config, self.tokenizer, resumed, self.folder.cache_dir / cache_file,
                                   self.rehearsal_pool)
        loop = TrainingLoop(self.state, self.config, self.runtime, self.tokenizer.token_bytes(), self.save_checkpoint,
                            dist=self.dist, memory=self.memory, rehearsal_pool=self.rehearsal_pool, clock=self.clock)
        return loop.run(dataset, run, on_event, stop or StopFlag(), resumed)

    def _start_run(self, dataset: TokenDataset | ChatDataset, name: str, cache_file: str, epochs: int,
                   kind: RunKind, held_out: list[list[Message]] | None, time_budget: Budget | None) -> RunState:
        """A new run: planned, listed in the history, and its data set remembered."""
        step = self.progress.step
        run = self.planner.new_run(dataset, name, cache_file, epochs, kind, self.config, self.model.config, step,
                                   time_budget)
        self.progress.run = run
        self.history.runs.append(RunRecord(name, step, run.epochs, dataset.n_train_tokens, kind, run.budget_s / 60))
        if kind is RunKind.CHAT:
            self.memory.register_conversations(name, cache_file, held_out or [])
        else:
            self.memory.register(self.tokenizer, dataset, name, cache_file)
        return run

    @_exclusive
    def train_conversations(self, source: ConversationSource, epochs: int, on_event: OnEvent = ignore_events,
                            stop: StopFlag | None = None, minutes: float = 0.0) -> TrainResult:
        """Fine-tune on conversations: the loss is on the assistant's replies only.

        A model made before the chat tokens existed gets them first (one journaled save).
        Rehearsal of earlier text stays on, so the model keeps what it knew.

        ``minutes`` > 0 is a time budget instead of ``epochs``, as for text: the model keeps
        its size, and the run ends when the time is up, everything from tokenizing to the
        last evaluation included, with the weights of its best pass. A budget shorter than
        a pass trains on a random sample of the conversations: each pass visits the packed
        rows in a shuffled order of its own (``ChatDataset.epoch_plan``); the held-out
        conversations are set aside before that (``split_conversations``), whatever the time.
        """
        started = self.clock()
        check_epochs(epochs)
        check_minutes(minutes)
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
        dataset, cache_file, held_out = conversation_data(source, self.tokenizer, chat_ids, self.model.config.context,
                                                          self.config.seed, self.folder.cache_dir, on_event)
        self.meta.chat_tuned = True  # saved with the run's first checkpoint
        time_budget = Budget(minutes * 60, started, self.clock) if minutes else None
        return self._run_on(dataset, source.name, cache_file, epochs, RunKind.CHAT, on_event, stop, held_out,
                            time_budget)

    # -- what continual learning builds on ------------------------------------------------
    def evaluate_datasets(self) -> dict[str, EvalResult]:
        """Validation results on the held-out text of every data set seen, by name."""
        self.load()
        return evaluate_held_out(self.model, self.tokenizer, self.memory, self.runtime, self.config.eval_batches)

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
        on_event(VocabGrowing(self.tokenizer.kind, max_new_tokens))
        expansion, growth = grow_tokenizer(self.tokenizer, texts, max_new_tokens, self.held_out_documents)
        if expansion.n_added:
            self._adopt_tokenizer(expansion.tokenizer, self.state.rows_of_parts(expansion.parts))
        return growth

    @_exclusive
    def add_chat_tokens(self) -> ChatTokenIds:
        """Give an older model the reserved chat tokens (appended; every old id unchanged)."""
        self.load()
        new_tok = add_chat_tokens(self.tokenizer)
        chat_ids = new_tok.chat_token_ids()
        self._adopt_tokenizer(new_tok, self.state.rows_for_chat_tokens(new_tok.vocab_size, self.tokenizer.eot_id,
                                                                        chat_ids.end))
        return chat_ids

    def _adopt_tokenizer(self, new_tok: BaseTokenizer, new_rows: torch.Tensor) -> None:
        """Switch to a grown tokenizer: embedding rows, optimizer moments and one journaled save."""
        self.state.grow_vocabulary(new_tok.vocab_size, new_rows, self.config, self.runtime)
        self.tokenizer = new_tok
        self.save_checkpoint(tokenizer_files(new_tok))
        remove_stale_caches(self.folder.cache_dir, new_tok)
