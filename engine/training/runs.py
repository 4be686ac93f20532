"""Where a training run stands, and when it stops.

``RunState`` and ``Progress`` are what a checkpoint records so that a resume is
exact. ``StopFlag``/``graceful_interrupts`` turn Ctrl+C and SIGTERM into a clean stop
after the current step, ``StopCheck`` adds the clock and, in a distributed run, the
agreement of every rank. ``Budget`` and ``BudgetClock`` are the wall clock of a
time-budget run, ``BestWeights`` its memory of the best held-out result. The
training loop asks these; it owns none of their rules.

Time is a parameter: everything here that reads a clock takes one (``Clock``, by
default ``time.monotonic``), so a test can run a time budget on a clock that moves
a fixed amount per step, whatever the machine's speed.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

from engine.folder.records import RunKind, SavedProgress, TextEnum
from engine.training.config import MAX_EPOCHS

if TYPE_CHECKING:
    import torch

    from engine.folder.records import EvalResult

REPLAN_EVERY = 10  # steps between re-plans of a time-budget run's schedule

Clock = Callable[[], float]  # seconds, only ever compared with the same clock (time.monotonic)


class StopReason(TextEnum):
    """Why a run ended. It equals its text (``== "terminated"``), is logged as it, and
    ``FINISHED`` is the empty, false one."""

    FINISHED = ""  # the run trained to its end (or its time budget's)
    INTERRUPTED = "interrupted"  # Ctrl+C
    TERMINATED = "terminated"  # SIGTERM
    TIME_LIMIT = "time limit reached"  # TrainConfig.max_minutes ran out before the epochs


class StopFlag:
    """Set by Ctrl+C or SIGTERM; the loop finishes its step, saves, and returns."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = StopReason.FINISHED

    def set(self, reason: StopReason | str) -> None:
        self.requested = True
        self.reason = StopReason(reason)


@contextlib.contextmanager
def graceful_interrupts(flag: StopFlag):
    """First Ctrl+C/SIGTERM asks the loop to stop after the current step; a second
    Ctrl+C stops at once (the last checkpoint on disk is still whole)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set(StopReason.INTERRUPTED if signum == signal.SIGINT else StopReason.TERMINATED)

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


class StopCheck:
    """Why a run stops before its next step (``FINISHED`` while it goes on).

    Alone, a process looks at its own flag and clock. The ranks of a distributed run
    must all stop after the same step, so each puts its flag and clock into that step's
    all-reduce (``votes``) and all of them follow what any one said (``agree``): a
    Ctrl+C or SIGTERM on any rank, or its time limit, stops every rank after that step.
    """

    # The first that any rank gave wins.
    REASONS = (StopReason.TERMINATED, StopReason.INTERRUPTED, StopReason.TIME_LIMIT)

    def __init__(self, flag: StopFlag, deadline: float | None, agreed_by_ranks: bool = False,
                 clock: Clock = time.monotonic) -> None:
        self.flag = flag
        self.deadline = deadline  # on ``clock``
        self.agreed_by_ranks = agreed_by_ranks
        self.clock = clock
        self.agreed = StopReason.FINISHED

    def local(self) -> StopReason:
        if self.flag.requested:
            return self.flag.reason
        if self.deadline is not None and self.clock() > self.deadline:
            return StopReason.TIME_LIMIT
        return StopReason.FINISHED

    def reason(self) -> StopReason:
        return self.agreed if self.agreed_by_ranks else self.local()

    def votes(self) -> list[float]:
        local = self.local()
        return [float(local == reason) for reason in self.REASONS]

    def agree(self, votes: list[float]) -> None:
        """``votes`` summed over the ranks."""
        self.agreed = next((reason for reason, n in zip(self.REASONS, votes) if n > 0), StopReason.FINISHED)


@dataclass
class RunState:
    """Where a training run stands; saved in the checkpoint so a resume is exact."""

    cache_file: str  # the token cache of the data (the run's identity)
    name: str
    epochs: int
    total_steps: int
    batch_size: int
    window: int  # the window length in force (shorter than the context for short texts)
    start_step: int
    epoch: int = 0
    batch: int = 0  # next batch of the current epoch
    run_step: int = 0
    micro_batches: int = 1  # > 1 after an out-of-memory back-off (per process in a distributed run)
    finished: bool = False
    kind: RunKind = RunKind.TEXT
    world_size: int = 1  # processes that share each batch (torchrun); batch_size is their total
    budget_s: float = 0.0  # a time-budget run: its wall-clock seconds (0: the epochs decide)
    spent_s: float = 0.0  # of them, spent so far (tokenizing included), kept across a resume

    def __post_init__(self) -> None:
        self.kind = RunKind(self.kind)  # "text"/"chat" from a caller become the enum

    def to_dict(self) -> dict:
        """Plain values only: the checkpoint is read back with ``weights_only=True``."""
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        d = dict(d)
        if "seq_len" in d:  # its name before format 2
            d["window"] = d.pop("seq_len")
        return cls(**d)


@dataclass(frozen=True)
class Budget:
    """A time budget counted from ``started`` (read on ``clock``), for one session."""

    seconds: float
    started: float
    clock: Clock = field(default=time.monotonic, compare=False)

    def spent(self) -> float:
        return self.clock() - self.started

    def seconds_left(self) -> float:
        return max(0.0, self.seconds - self.spent())


class BudgetClock:
    """The wall clock of a time-budget run in this session, and its schedule.

    The run ends at its deadline, early enough that the final evaluation fits in the
    budget too. Every ``REPLAN_EVERY`` steps the learning-rate schedule's length is
    set from the steps timed so far, so the cosine reaches its floor as time runs out.
    The re-planned length is part of ``RunState``: a resume goes on from it.

    In a distributed run every rank re-plans at the same steps from its own clock, and
    the loop then makes every rank take rank 0's plan (``replanned`` says when): a
    learning rate that differed between ranks would pull their weights apart.
    """

    def __init__(self, run: RunState, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.session_start = clock()
        self.spent_before = run.spent_s
        self.deadline = self.session_start + max(0.0, run.budget_s - run.spent_s)
        self.end = self.deadline  # the budget's end; ``deadline`` leaves room for the final evaluation
        self.steps = 0
        self.timed_from: float | None = None  # after the first step (allocations, kernel choices)
        self.replanned = False  # whether the last ``after_step`` re-planned the schedule

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.session_start

    def after_step(self, run: RunState, eval_batches: int, other_deadline: float | None,
                   steps_per_epoch: int) -> float:
        """Count a step (``run.batch`` and ``run.run_step`` not yet advanced past it);
        returns the deadline in force from now on."""
        now = self.clock()
        run.spent_s = self.spent()
        self.steps += 1
        self.replanned = False
        if self.timed_from is None:
            self.timed_from = now
        elif self.steps % REPLAN_EVERY == 0:
            step_s = (now - self.timed_from) / (self.steps - 1)
            # An evaluation batch is a forward pass: about a third of a training step.
            reserve = min(eval_batches * step_s / 3 + 1.0, 0.2 * run.budget_s)
            self.deadline = self.end - reserve
            run.total_steps = run.run_step + 1 + max(0, int((self.deadline - now) / step_s))
            # Enough epochs for those steps, and one to spare should the steps get faster:
            # the clock ends the run, never the epoch count.
            left_after_this_epoch = run.total_steps - run.run_step - (steps_per_epoch - run.batch)
            run.epochs = min(MAX_EPOCHS, run.epoch + 2 + max(0, -(-left_after_this_epoch // steps_per_epoch)))
            self.replanned = True
        return min(self.deadline, other_deadline if other_deadline is not None else math.inf)


class BestWeights:
    """The weights of a time-budget run's best held-out evaluation so far, on the CPU.

    A budget fills its minutes with passes over the text, and on a small text later
    passes can overfit it: on an 82,000-token text, 10 minutes reached 2.29 bits/byte
    where 3 minutes of the same shape had reached 2.06 (README, "Time budget"). So the
    run evaluates after each pass, keeps the best weights, and ends with them if the
    last evaluation is worse, as nanoGPT keeps its best validation checkpoint. Held
    in memory only: a run resumed after Ctrl+C starts a new record.
    """

    def __init__(self) -> None:
        self.result: EvalResult | None = None
        self._state: dict[str, torch.Tensor] = {}

    def offer(self, model: torch.nn.Module, result: EvalResult) -> None:
        if self.beats(result):
            return
        self.result = result
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def beats(self, result: EvalResult) -> bool:
        """Strictly better than ``result``: a tie keeps the later, more trained weights."""
        return self.result is not None and self.result.val_loss < result.val_loss

    def restore(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self._state)


@dataclass
class Progress(SavedProgress):
    """The model's counters over its whole life (``SavedProgress``: step, tokens seen, epochs
    done), and the current run."""

    run: RunState | None = None

    def saved(self) -> SavedProgress:
        """The counters alone, for config.json (which never holds the run)."""
        return SavedProgress(self.step, self.tokens_seen, self.epochs_done)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "run": self.run.to_dict() if self.run else None}

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        run = d.get("run")
        return cls(d["step"], d["tokens_seen"], d["epochs_done"], RunState.from_dict(run) if run else None)


def micro_batches_for(run: RunState, world_size: int) -> int:
    """The micro-batches per process that keep the slice size of ``run`` on ``world_size`` processes."""
    rows_per_slice = -(-(run.batch_size // run.world_size) // run.micro_batches)
    return max(1, -(-(run.batch_size // world_size) // rows_per_slice))
