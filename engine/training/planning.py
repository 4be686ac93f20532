"""Planning: a new model's tokenizer and shape, a time budget's plan, a run's data and schedule.

Everything decided before the first step: ``Planner`` turns the user's preset, sizes
and time budget into a ``ModelConfig`` (with ``engine.training.budget``'s rules for a
budget, which also size a new tokenizer's vocabulary) and a new run into a
``RunState`` (batch size, steps, epochs). Training a new model's tokenizer, growing
an existing one for new text, preparing the windows of a conversation set, the checks
that a distributed run can split its batches, and what a resumed run changes when it
goes on with another number of processes live here too.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from engine.data.chat_format import ChatTokenIds, Message
from engine.data.chat_windows import ChatDataset
from engine.data.conversations import ConversationSource, split_conversations
from engine.data.sources import Source
from engine.data.tokenizer import BaseTokenizer, supported_vocab_size, train_tokenizer
from engine.data.vocab_growth import Expansion, expand_tokenizer, tokenization_drift, tokens_per_byte
from engine.data.windows import TokenDataset, load_cached_tokens
from engine.folder.records import RunKind
from engine.model.config import ModelConfig
from engine.runtime import hardware
from engine.training import budget
from engine.training import config as training_config
from engine.training.config import MAX_EPOCHS, Recipe, TrainConfig
from engine.training.events import Notice, OnEvent, TokenizerTraining, VocabGrowth
from engine.training.runs import Budget, RunState, micro_batches_for

ARCHITECTURE = ("d_model", "n_layer", "n_head")  # the sizes that pin a shape a time budget keeps
GROWTH_SAMPLE_BYTES = 5_000_000  # text that vocabulary growth learns its merges from


class Planner:
    """What to build and for how long, from the user's choices and this machine.

    A new model takes the user's settings over ``recipe`` (``config.NEW_MODEL_RECIPE``:
    the block design and optimizer a new model gets by default). ``flop_rate`` is the
    training FLOP/s of the whole job that a time budget's probe measured: measured once
    per Trainer, then reused for the vocabulary, the plan and the run's first estimate of
    its steps. In a torchrun job of ``world_size`` processes each trains its share of
    every batch on a device like this one, so the job's rate is this process's, probed at
    its share of the batch, times the processes; the loop re-plans from the real steps.
    """

    def __init__(self, runtime: hardware.Runtime, preset: str | None = None, model_overrides: dict | None = None,
                 train_overrides: dict | None = None, world_size: int = 1, recipe: Recipe | None = None) -> None:
        self.runtime, self.preset = runtime, preset
        self.model_overrides = model_overrides or {}
        self.train_overrides = train_overrides or {}
        self.world_size = world_size
        self.recipe = recipe or training_config.NEW_MODEL_RECIPE
        self.flop_rate: float | None = None
        self.vocabulary: budget.VocabularyChoice | None = None  # a time budget's choice, for its plan

    def model_config(self, vocab_size: int, plan: budget.BudgetPlan | None = None) -> ModelConfig:
        """A new model's config: the plan's shape, else the preset's or the device's; sizes the user gave win."""
        if plan is not None:
            return self.config_for(vocab_size, plan.shape, plan.dropout)
        if self.preset:
            _, d_model, n_layer, n_head = hardware.preset_by_name(self.preset)
        else:
            _, d_model, n_layer, n_head = hardware.pick_preset(self.runtime)
        return self._with_choices(vocab_size, {"d_model": d_model, "n_layer": n_layer, "n_head": n_head})

    def config_for(self, vocab_size: int, shape: budget.Shape, dropout: float | None = None) -> ModelConfig:
        """A new model of ``shape``, with the recipe's block design and the user's settings."""
        values = {"d_model": shape.d_model, "n_layer": shape.n_layer, "n_head": shape.n_head, "context": shape.context}
        if dropout is not None:
            values["dropout"] = dropout
        return self._with_choices(vocab_size, values)

    def _with_choices(self, vocab_size: int, values: dict) -> ModelConfig:
        """``values``, the recipe's block design over them, and everything the user set over both."""
        settings = {**values, **self.recipe.model_settings(self.model_overrides), **self.model_overrides}
        return ModelConfig(vocab_size=vocab_size, **settings)

    def new_model(self, vocab_size: int, data_tokens: int, minutes: float, config: TrainConfig,
                  on_event: OnEvent) -> tuple[ModelConfig, TrainConfig]:
        """A new model's config, and the training settings it starts with.

        With a time budget (``minutes``) both follow the plan, which is told before training.
        """
        if not minutes:
            return self.model_config(vocab_size), config
        plan = self.budget_plan(minutes, data_tokens, vocab_size, config)
        on_event(Notice(plan.describe()))
        return self.model_config(vocab_size, plan), replace(config, learning_rate=plan.learning_rate)

    def pinned_shape(self) -> budget.Shape | None:
        """The shape the user chose (a preset or sizes), which a time budget keeps."""
        if not (self.preset or set(ARCHITECTURE) & set(self.model_overrides)):
            return None
        c = self.model_config(1)
        return budget.Shape(c.d_model, c.n_layer, c.n_head, c.context)

    def context(self) -> int:
        """The context a new model gets: the user's, else ``ModelConfig``'s default."""
        return self.model_overrides.get("context", ModelConfig(vocab_size=1).context)

    def budget_vocabulary(self, minutes: float, n_bytes: int, config: TrainConfig) -> int | None:
        """The size a new model's tokenizer is trained to under a time budget; ``None`` without one.

        A vocabulary the user gave (``--target-vocab-size``) is kept, lowered only when the
        text cannot support it (``supported_vocab_size``): the budget sweep compares sizes
        that way. Otherwise that size (or the default) is the ceiling and the plan picks
        below it (``budget.plan_vocabulary``), also for a shape the user pinned: the
        vocabulary is then the one size left open, and the rule's reason (embedding rows a
        small model hardly trains) holds whatever chose the shape.

        The plan needs no count of the data's tokens for this, which only the tokenizer
        trained here could give: the shape follows the tokens the time buys, not the data's;
        only dropout follows the data, and ``budget_plan`` sets it after tokenizing, from
        the real count.
        """
        if not minutes:
            return None
        requested = config.target_vocab_size
        ceiling = supported_vocab_size(requested, n_bytes)
        pinned = "target_vocab_size" in self.train_overrides
        size = ceiling
        if not pinned:
            # The probe's model has the ceiling's output head; its FLOP/s carry over to a smaller one.
            self.measure(minutes, ceiling, config)
            size = budget.plan_vocabulary(minutes, self.flop_rate, ceiling, self.context(), self.pinned_shape())
        self.vocabulary = budget.VocabularyChoice(size, requested, ceiling, pinned)
        return size

    def budget_plan(self, minutes: float, data_tokens: int, vocab_size: int, config: TrainConfig) -> budget.BudgetPlan:
        """Probe this machine (once) and plan ``minutes`` of training on ``data_tokens`` tokens.

        What the user set (learning rate, dropout) wins over the plan, and the plan's
        description says so, since it shows the values in force.
        """
        batch = self.measure(minutes, vocab_size, config)
        plan = budget.plan_budget(minutes, self.flop_rate, int(data_tokens * (1 - config.val_fraction)),
                                  vocab_size, batch * self.world_size, self.context(), self.pinned_shape(),
                                  self.recipe.base_learning_rate(self.train_overrides))
        return replace(plan, learning_rate=self.train_overrides.get("learning_rate", plan.learning_rate),
                       dropout=self.model_overrides.get("dropout", plan.dropout), vocabulary=self.vocabulary)

    def measure(self, minutes: float, vocab_size: int, config: TrainConfig) -> int:
        """Probe a new model's reference unless ``flop_rate`` is known; returns its batch per process.

        The reference is the pinned shape (then the rate is that of the model that trains),
        else ``budget.PROBE_SHAPE``, at the run's context, with the recipe's block design and
        the run's optimizer (``config``).
        """
        model = self.config_for(vocab_size, self.pinned_shape() or budget.Shape(*budget.PROBE_SHAPE, self.context()))
        batch = self.batch_per_process(config, model, model.context)
        if self.flop_rate is None:
            self.probe(model, config, batch, minutes)
        return batch

    def batch_per_process(self, config: TrainConfig, model: ModelConfig, window: int) -> int:
        """The sequences of ``window`` tokens one process trains per step: its share of the batch the
        user set, else the device's for ``model``."""
        if config.batch_size:
            return max(1, config.batch_size // self.world_size)
        return hardware.default_batch_size(self.runtime, model, window)

    def probe(self, model: ModelConfig, config: TrainConfig, batch_per_process: int, minutes: float) -> float:
        """The job's training FLOP/s (``flop_rate``): this process's probe of ``model`` at its share of the batch."""
        rate = budget.probe_flop_rate(self.runtime, model, batch_per_process, config, budget.probe_seconds(minutes))
        self.flop_rate = rate * self.world_size
        return self.flop_rate

    def tokens_per_s(self, model: ModelConfig, config: TrainConfig, batch_size: int, window: int,
                     minutes: float) -> float:
        """What the job is expected to train of ``model`` per second (the probe's rate, measured once)."""
        shape = budget.Shape(model.d_model, model.n_layer, model.n_head, window)
        if self.flop_rate is None:  # an existing model: probed as it will train, at this process's share
            self.probe(replace(model, context=window), config, max(1, batch_size // self.world_size), minutes)
        return self.flop_rate / shape.flops_per_token(model.vocab_size)

    def new_run(self, dataset: TokenDataset | ChatDataset, name: str, cache_file: str, epochs: int, kind: RunKind,
                config: TrainConfig, model: ModelConfig, start_step: int,
                time_budget: Budget | None = None) -> RunState:
        """A new run on ``dataset``: its global batch, its steps and, for a time budget, a first guess of them.

        In a distributed run the batch is the global one (by default each process's usual
        batch, times the processes), and the schedule follows it as for one process.
        """
        world_size = self.world_size
        batch_size = config.batch_size or world_size * self.batch_per_process(config, model, dataset.window)
        check_batch_splits(dataset, batch_size, config.seed, world_size, resumed=False)
        steps_per_epoch = dataset.epoch_plan(config.seed, 0, batch_size).n_batches
        total_steps = epochs * steps_per_epoch
        if time_budget is not None:
            # A first guess from the probe; the loop re-plans it from the steps it times.
            rate = self.tokens_per_s(model, config, batch_size, dataset.window, time_budget.seconds / 60)
            total_steps = max(1, int(time_budget.seconds_left() * rate / (batch_size * dataset.window)))
            epochs = min(MAX_EPOCHS, 2 + 2 * total_steps // steps_per_epoch)  # the clock ends it, not these
        return RunState(cache_file=cache_file, name=name, epochs=epochs, total_steps=total_steps,
                        batch_size=batch_size, window=dataset.window, start_step=start_step, kind=kind,
                        world_size=world_size, budget_s=time_budget.seconds if time_budget else 0.0,
                        spent_s=time_budget.spent() if time_budget else 0.0)


def check_batch_splits(dataset: TokenDataset | ChatDataset, batch_size: int, seed: int, world_size: int,
                       resumed: bool) -> None:
    """A distributed run splits every batch evenly over the processes, or refuses to start."""
    if world_size == 1:
        return
    rows = dataset.epoch_plan(seed, 0, batch_size).batch_size  # less when the data holds less
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


def rejoin(run: RunState, world_size: int, on_event: OnEvent) -> None:
    """A resumed run going on with another number of processes: the same slices per process."""
    if run.world_size == world_size:
        return
    on_event(Notice(f"this run was saved by {run.world_size} process(es) and goes on with {world_size}: "
                    f"the same step, data position and learning-rate schedule, each process taking "
                    f"{run.batch_size // world_size} of the {run.batch_size} sequences of a batch; "
                    "dropout draws differ from those of an uninterrupted run"))
    run.micro_batches = micro_batches_for(run, world_size)
    run.world_size = world_size


def text_data(tokens: np.ndarray, context: int, val_fraction: float, on_event: OnEvent) -> TokenDataset:
    """Windows of ``tokens``; a text shorter than the context trains on shorter ones, and says so."""
    dataset = TokenDataset(tokens, context, val_fraction)
    if dataset.shortened:
        on_event(Notice(f"the text is short ({len(tokens)} tokens): training on windows of "
                        f"{dataset.window} tokens instead of {context}"))
    return dataset


def open_run_data(path: Path, run: RunState, context: int, val_fraction: float) -> TokenDataset | ChatDataset:
    """The data of a saved run, from its cache file: conversations or token windows."""
    if run.kind is RunKind.CHAT:
        return ChatDataset.load(path)
    return TokenDataset(load_cached_tokens(path), context, val_fraction)


def new_tokenizer(kind: str, source: Source, requested: int, on_event: OnEvent,
                  planned: int | None = None) -> BaseTokenizer:
    """A new model's tokenizer: of the ``planned`` size (``Planner.budget_vocabulary``), else as large
    as ``requested`` or as the text supports."""
    target = planned or supported_vocab_size(requested, source.n_bytes)
    on_event(TokenizerTraining(kind, target))
    tok = train_tokenizer(kind, source.sample_for_tokenizer(), target)
    aimed = planned or requested  # a plan below the request says why itself
    if tok.vocab_size < aimed:
        # Said now, before training starts: it explains the model that follows.
        on_event(Notice(f"vocabulary lowered from {aimed} to {tok.vocab_size}: "
                        f"{source.n_bytes:,} bytes of text cannot support more tokens"))
    return tok


def conversation_data(source: ConversationSource, tok: BaseTokenizer, chat_ids: ChatTokenIds, context: int,
                      seed: int, cache_dir: Path,
                      on_event: OnEvent) -> tuple[ChatDataset, str, list[list[Message]]]:
    """The windows of a conversation set (cached), their cache file's name, and the held-out conversations."""
    cache_file = f"{source.content_hash()[:20]}-{tok.fingerprint()}.ctx{context}.chat.npz"
    path = cache_dir / cache_file
    cache_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = split_conversations(source.conversations, seed)
    if held_out is train:
        on_event(Notice(f"only {len(train)} conversation(s): all are trained on, so the held-out loss is "
                        "measured on them too"))
    if path.exists():
        return ChatDataset.load(path), cache_file, held_out
    dataset = ChatDataset.build(tok, chat_ids, train, held_out, context)
    dataset.save(path)
    return dataset, cache_file, held_out


def grow_tokenizer(tok: BaseTokenizer, texts: list[str], max_new_tokens: int,
                   held_out: Callable[[], list[str]]) -> tuple[Expansion, VocabGrowth]:
    """Merges learned from a sample of ``texts`` (``GROWTH_SAMPLE_BYTES``), and the report of them.

    ``held_out`` gives the earlier data sets' held-out documents, read only when tokens
    were added: the report says what share of them now tokenizes differently.
    """
    sample, size = [], 0
    for text in texts:  # learning merges needs a representative sample, not every byte
        sample.append(text[:GROWTH_SAMPLE_BYTES - size])
        size += len(sample[-1])
        if size >= GROWTH_SAMPLE_BYTES:
            break
    expansion = expand_tokenizer(tok, sample, max_new_tokens)
    if expansion.n_added == 0:
        return expansion, VocabGrowth(0, [], tok.vocab_size, tok.vocab_size)
    new_tok, old_val = expansion.tokenizer, held_out()
    return expansion, VocabGrowth(expansion.n_added, expansion.added[:12], tok.vocab_size, new_tok.vocab_size,
                                  tokens_per_byte_before=tokens_per_byte(tok, sample),
                                  tokens_per_byte_after=tokens_per_byte(new_tok, sample),
                                  drift=tokenization_drift(tok, new_tok, old_val) if old_val else 0.0)
