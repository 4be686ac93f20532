"""The training loop of one run: epochs of steps, and when to save, evaluate and stop.

``TrainingLoop.run`` is the same on every rank of a distributed run. It owns the order
of things (a step, its record, a checkpoint every ``checkpoint_every`` steps, an
evaluation and a save at the end of each pass, the end of the run) and asks the parts
for the rest: the ``StepRunner`` for the step, ``evaluation`` for held-out results,
``save`` (the checkpointer) to save, the ``StopCheck`` and the ``BudgetClock`` whether
to stop. The clock is a parameter (``time.monotonic`` by default), so a test can run a
time budget on a clock that advances by a fixed amount per step.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from engine.data.chat_windows import ChatDataset
from engine.data.windows import EpochPlan, TokenDataset
from engine.folder.records import EvalResult, RunKind, StepRecord
from engine.runtime import hardware
from engine.runtime.distributed import Distributed
from engine.training.checkpoint import Checkpointer, RunPackage, TrainingState, restore_rng, rng_state
from engine.training.config import TrainConfig, lr_at
from engine.training.dataset_memory import DatasetMemory, balance_replayed_targets, dataset_id_of, mix_in_rehearsal
from engine.training.evaluation import evaluate_run
from engine.training.events import (
    Checkpointed,
    EpochEnded,
    EpochStarted,
    Evaluated,
    Notice,
    OnEvent,
    RunEnded,
    RunStarted,
    StepDone,
    TrainResult,
    ignore_events,
)
from engine.training.planning import open_run_data
from engine.training.runs import (
    BestWeights,
    BudgetClock,
    Clock,
    RunState,
    StopCheck,
    StopFlag,
    StopReason,
    graceful_interrupts,
)
from engine.training.step import StepRunner

Data = TokenDataset | ChatDataset


def next_batch(dataset: Data, plan: EpochPlan, run: RunState, rehearsal_pool: np.ndarray | None,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The run's next global batch (x, y, segments), earlier data replayed into its last rows.

    ``segments`` marks packed conversations (None for text). The replayed rows are drawn
    from a seed made of the run's position, so a resumed run replays the same ones.
    """
    x, y, *segments = dataset.train_batch(plan, run.batch)
    segments = segments[0] if segments else None
    if rehearsal_pool is not None:
        key = (cfg.seed, run.epoch, run.batch)
        replayed = mix_in_rehearsal(x, y, rehearsal_pool, cfg.rehearsal, key)
        if segments is not None and replayed:
            segments[-replayed:] = 0  # a replayed text row is one plain window
            balance_replayed_targets(y, replayed, cfg.rehearsal, key)
    return x, y, segments


class TrainingLoop:
    """Trains one run to its end or to a stop.

    Every rank of a distributed run builds the same global batch and trains its own rows
    of it (``StepRunner``), so no window is trained twice in an epoch and the schedule is
    that of one process. ``memory`` is None where this process keeps no record of the
    data sets (a rank > 0); ``save`` on such a rank only hands its random state to rank 0.
    """

    def __init__(self, state: TrainingState, config: TrainConfig, runtime: hardware.Runtime,
                 token_bytes: np.ndarray, save: Callable[[], None], *, dist: Distributed | None = None,
                 memory: DatasetMemory | None = None, rehearsal_pool: np.ndarray | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.state, self.config, self.runtime, self.dist = state, config, runtime, dist
        self.token_bytes, self.save, self.memory, self.rehearsal_pool = token_bytes, save, memory, rehearsal_pool
        self.clock = clock
        self.steps_here = 0  # optimizer steps taken in this call
        self.final_eval: EvalResult | None = None
        # Set when the run begins (``_begin``): they depend on the run and the stop flag.
        self.stopping: StopCheck | None = None
        self.stepper: StepRunner | None = None
        self.budget: BudgetClock | None = None  # a time-budget run's clock and schedule
        self.best: BestWeights | None = None  # a time-budget run's best pass
        self.deadline: float | None = None  # TrainConfig.max_minutes, or the budget's first deadline
        self.eval_batches = 0  # what the final evaluation of a time budget runs, kept time for
        self.memory_checked = dist is None  # a distributed run first finds a micro-batch every rank holds

    def run(self, dataset: Data, run: RunState, on_event: OnEvent, stop: StopFlag, resumed: bool) -> TrainResult:
        self._begin(dataset, run, on_event, stop, resumed)
        with graceful_interrupts(stop):
            while run.epoch < run.epochs and self._train_epoch(dataset, run, on_event):
                self._end_epoch(dataset, run, on_event)
            stopped = self._end_run(dataset, run, on_event)
            self.save()
        self.stepper = None  # DDP's wrapper and the compiled model end with the run
        step = self.state.progress.step
        on_event(RunEnded(stopped, step))
        return TrainResult(self.steps_here, step, stopped, self.final_eval, resumed)

    def _begin(self, dataset: Data, run: RunState, on_event: OnEvent, stop: StopFlag, resumed: bool) -> None:
        """Wrap and compile the model, set the clocks and deadlines, and announce the run."""
        cfg, model, rt = self.config, self.state.model, self.runtime
        model.train()
        self.stopping = StopCheck(stop, None, agreed_by_ranks=self.dist is not None, clock=self.clock)
        self.stepper = StepRunner(model, self.state.optimizer, self.state.scaler, rt, cfg.grad_clip, self.stopping,
                                  self.dist)
        if cfg.compile:
            self.stepper.compile(on_event)
        deadline = self.clock() + cfg.max_minutes * 60 if cfg.max_minutes else None
        if run.budget_s:
            self.budget = BudgetClock(run, clock=self.clock)
            self.best = BestWeights()
            self.eval_batches = dataset.val_batch_count(run.batch_size, cfg.eval_batches)
            deadline = min(deadline or math.inf, self.budget.deadline)
        self.deadline = self.stopping.deadline = deadline
        minutes_left = (self.budget.deadline - self.budget.session_start) / 60 if self.budget else 0.0
        on_event(RunStarted(resumed=resumed, params=model.num_params(), train_tokens=dataset.n_train_tokens,
                            device=str(rt.device), precision=rt.precision, epochs=run.epochs,
                            batch_size=run.batch_size, window=run.window, micro_batches=run.micro_batches,
                            world_size=run.world_size, minutes_left=minutes_left))

    def _train_epoch(self, dataset: Data, run: RunState, on_event: OnEvent) -> bool:
        """Train what is left of the current pass; False when a stop came before its end."""
        plan = dataset.epoch_plan(self.config.seed, run.epoch, run.batch_size)
        on_event(EpochStarted(run.epoch, 0 if self.budget else run.epochs, plan.n_batches, run.batch))
        while run.batch < plan.n_batches:
            if self.stopping.reason():
                return False
            self._train_batch(dataset, plan, run, on_event)
        return not self.stopping.reason()

    def _train_batch(self, dataset: Data, plan: EpochPlan, run: RunState, on_event: OnEvent) -> None:
        """One step on the next batch, its record, and a checkpoint when one is due."""
        cfg, progress = self.config, self.state.progress
        t0 = time.perf_counter()  # tokens/s as measured, whatever clock decides when to stop
        x, y, segments = next_batch(dataset, plan, run, self.rehearsal_pool, cfg)
        if not self.memory_checked:
            rng = rng_state(self.runtime)  # the trial must not move the random state
            self.stepper.agree_on_micro_batches(x, y, segments, run, on_event, progress.step)
            restore_rng(rng, self.runtime)
            self.memory_checked = True
        lr = lr_at(run.run_step, run.total_steps, cfg)
        loss = self.stepper.step(x, y, lr, run, on_event, segments, progress.step)
        dt = time.perf_counter() - t0
        if self.budget is not None:
            self.stopping.deadline = self.budget.after_step(run, self.eval_batches, self.deadline, plan.n_batches)
            if self.dist is not None and self.budget.replanned:
                self._take_rank0_schedule(run)
        run.batch += 1
        run.run_step += 1
        progress.step += 1
        progress.tokens_seen += x.numel()
        self.steps_here += 1
        self.state.history.steps.append(StepRecord(progress.step, round(loss, 5), lr))
        # x is the global batch: in a distributed run this is the whole job's tokens/s
        on_event(StepDone(progress.step, loss, lr, x.numel() / dt, run.batch, plan.n_batches))
        if progress.step % cfg.checkpoint_every == 0:
            self.save()
            on_event(Checkpointed(progress.step))

    def _take_rank0_schedule(self, run: RunState) -> None:
        """Every rank of a distributed budget run goes on with rank 0's re-planned schedule.

        One all-reduce of the steps and passes in which only rank 0's count: its broadcast.
        Every rank re-plans at the same step (``BudgetClock.replanned``), so all take part.
        """
        mine = [run.total_steps, run.epochs] if self.dist.is_main else [0, 0]
        agreed = self.dist.all_reduce_sum(torch.tensor(mine, dtype=torch.float64, device=self.runtime.device))
        run.total_steps, run.epochs = (int(v) for v in agreed.tolist())

    def _end_epoch(self, dataset: Data, run: RunState, on_event: OnEvent) -> None:
        """A pass is done: count it, evaluate, remember the best weights of a budget, save."""
        run.epoch += 1
        run.batch = 0
        self.state.progress.epochs_done += 1
        self.final_eval = self._evaluate(dataset, run, on_event)
        if self.best is not None:
            self.best.offer(self.state.model, self.final_eval)
        self.save()
        on_event(EpochEnded(run.epoch, run.epochs))

    def _end_run(self, dataset: Data, run: RunState, on_event: OnEvent) -> StopReason:
        """Why the run ended, and what that leaves to do before the last save."""
        stopped = self.stopping.reason()
        if stopped and stopped is not StopReason.TIME_LIMIT:
            return stopped  # asked to stop: saved where it stands, to resume
        if self.budget is not None:  # the budget is spent (or the data ran out first): done
            self._end_budget(dataset, run, on_event)
            return StopReason.FINISHED
        if run.epoch < run.epochs:  # TrainConfig.max_minutes ran out first
            self.final_eval = self._evaluate(dataset, run, on_event, partial_epoch=True)
            return StopReason.TIME_LIMIT
        run.finished = True
        return StopReason.FINISHED

    def _end_budget(self, dataset: Data, run: RunState, on_event: OnEvent) -> None:
        """A time budget ends finished, evaluated, and with its best pass's weights."""
        progress, best = self.state.progress, self.best
        if self.steps_here == 0:
            on_event(Notice(f"the time budget was spent before the first step ({self.budget.spent():.0f} s "
                            "went to reading and tokenizing the data); give it more minutes"))
        run.finished = True
        if self.final_eval is None or self.final_eval.step != progress.step:  # not just evaluated at a pass's end
            self.final_eval = self._evaluate(dataset, run, on_event, partial_epoch=run.batch > 0)
        if best.beats(self.final_eval):
            best.restore(self.state.model)
            on_event(Notice(f"kept the weights of pass {best.result.epoch} (held-out {best.result.bpb:.4f} "
                            f"bits/byte, against {self.final_eval.bpb:.4f} at the end): later passes over "
                            f"{'these conversations' if run.kind is RunKind.CHAT else 'this text'} overfit it"))
            self.final_eval = self.record(replace(best.result, step=progress.step, epoch=run.epoch,
                                                  partial_epoch=run.batch > 0), run)
        run.spent_s = self.budget.spent()

    def _evaluate(self, dataset: Data, run: RunState, on_event: OnEvent, partial_epoch: bool = False) -> EvalResult:
        result = self.record(self.evaluate(dataset, run, partial_epoch), run)
        on_event(Evaluated(result))
        return result

    def evaluate(self, dataset: Data, run: RunState, partial_epoch: bool = False) -> EvalResult:
        """The held-out result of the run's data now, labelled with the step, pass and data set."""
        result = evaluate_run(self.state.model, dataset, self.token_bytes, run, self.config.eval_batches,
                              self.runtime, self.dist)
        return replace(result, step=self.state.progress.step, epoch=run.epoch, dataset=run.name,
                       partial_epoch=partial_epoch)

    def record(self, result: EvalResult, run: RunState) -> EvalResult:
        """The folder's record of the latest evaluation: what Training Status and Continue read."""
        if self.memory is not None:
            self.memory.note_latest(dataset_id_of(run.cache_file), result)
        self.state.history.evals.append(result)
        return result


def follow_run(dist: Distributed, stop: StopFlag, clock: Clock = time.monotonic) -> TrainResult:
    """A rank > 0 of a distributed run: wait for the run rank 0 prepares (a ``RunPackage``),
    then train its share of every batch until rank 0's run ends. Reports nothing, writes nothing."""
    package: RunPackage = dist.receive()
    state, config, tokenizer = package.unpack(dist)
    path = dist.fetch_file(package.data)
    run = state.progress.run
    dataset = open_run_data(path, run, state.model.config.context, config.val_fraction)
    checkpointer = Checkpointer(None, dist.runtime, dist)  # a save hands this rank's RNG state to rank 0
    loop = TrainingLoop(state, config, dist.runtime, tokenizer.token_bytes(),
                        lambda: checkpointer.save(state, config, None, []), dist=dist,
                        rehearsal_pool=package.rehearsal_pool, clock=clock)
    return loop.run(dataset, run, ignore_events, stop, package.resumed)
