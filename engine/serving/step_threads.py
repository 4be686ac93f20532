"""How many threads a step of the server's batch uses: every core while that is measured faster.

The server leaves a core to its event loop (``hardware.configure_cpu_threads_for_serving``).
A step of one or a few rows costs what reading the weights costs, and a second thread
buys nothing there. A step of many rows is arithmetic (the products, the top-k of every
row, each sequence's attention over its heads), and there the idle core pays: on the
2-core Xeon, 16 rows took 4.8 ms with two threads against 6.1 ms with one, in process.

But an OpenMP team is as slow as its slowest thread. When another program holds a
core, every parallel region waits for the thread it displaced: beside one busy process,
16 streams fell from 2,387 tokens/s with one thread to 469 with two. So the choice is
measured where it is made. ``StepThreads`` times every step of at least ``min_rows``
rows, keeps the cost per row of the setting in use, and now and then tries the other
for a few steps; it keeps whichever was cheaper. A trial step that costs twice the
setting in use ends its trial at once (a stalled team costs many times a step), and a
lost trial doubles the wait before the next one, so a machine that stays busy pays for
fewer and fewer trials, and one that becomes quiet again is noticed within
``max_interval`` big steps.

A step's values do not depend on its threads: every part of the batched step is
row-wise or per sequence (decoder.py), which the batching tests check with two threads.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class StepThreads:
    """``threads(rows)`` before a step of ``rows`` Decoder rows, ``record(...)`` after it.

    ``few``: the threads a server's generation uses anyway; ``many``: every usable core.
    """

    few: int
    many: int
    min_rows: int = 7  # 7 rows: 2,327 us on two threads, 2,532 on one; 6 rows: 2,197 and 2,252 (in process)
    interval: int = 32  # big steps between two trials of the other setting, while the last trial won
    max_interval: int = 1024
    trial_steps: int = 3  # a trial's cost is the median of this many steps: the first one wakes the threads
    give_up: float = 2.0  # a trial step this many times dearer than the setting in use ends the trial
    smoothing: float = 0.2  # weight of each new step in the running cost of the setting in use
    steps: dict[int, int] = field(default_factory=dict)  # big steps taken per thread count
    _best: int = field(init=False)
    _cost: dict[int, float] = field(init=False, default_factory=dict)  # seconds per row
    _wait: int = field(init=False)
    _since: int = field(init=False, default=0)  # big steps since the last trial ended
    _trial: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._best = self.many
        self._wait = self.interval

    @property
    def chosen(self) -> int:
        """The setting that was cheaper so far (``many`` until measured otherwise)."""
        return self._best

    def threads(self, rows: int) -> int:
        """The threads the next step, of ``rows`` rows, should use."""
        if not self._chosen_here(rows):
            return self.few
        if self._best not in self._cost:
            return self._best
        if self._other not in self._cost or self._since >= self._wait:
            return self._other
        return self._best

    def record(self, threads: int, rows: int, seconds: float) -> None:
        """What a step that ``threads(rows)`` chose cost, start to end."""
        if not self._chosen_here(rows) or threads not in (self.few, self.many):
            return
        self.steps[threads] = self.steps.get(threads, 0) + 1
        per_row = seconds / rows
        if threads == self._best:
            old = self._cost.get(threads)
            self._cost[threads] = per_row if old is None else old + self.smoothing * (per_row - old)
            self._since += 1
            return
        self._trial.append(per_row)
        hopeless = per_row > self.give_up * self._cost.get(self._best, float("inf"))
        if len(self._trial) < self.trial_steps and not hopeless:
            return
        cost, self._trial, self._since = statistics.median(self._trial), [], 0
        self._cost[threads] = cost
        if cost < self._cost[self._best]:
            log.info("steps of %d rows or more now use %d thread(s): %.0f us a row against %.0f",
                     self.min_rows, threads, cost * 1e6, self._cost[self._best] * 1e6)
            self._best, self._wait = threads, self.interval
        else:
            self._wait = min(self.max_interval, 2 * self._wait)

    def _chosen_here(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows is one whose threads this policy chooses and times."""
        return rows >= self.min_rows and self.many > self.few

    @property
    def _other(self) -> int:
        return self.few if self._best == self.many else self.many
