"""The server's choice of threads per step: every core while measured faster, one core when not."""
from __future__ import annotations

from engine.serving.step_threads import StepThreads


def drive(policy: StepThreads, steps: int, cost_per_row: dict[int, float], rows: int = 16) -> list[int]:
    """Run ``steps`` steps of ``rows`` rows whose cost per row depends on the threads chosen."""
    chosen = []
    for _ in range(steps):
        threads = policy.threads(rows)
        policy.record(threads, rows, cost_per_row[threads] * rows)
        chosen.append(threads)
    return chosen


def test_small_steps_keep_the_servers_threads_and_are_not_timed():
    policy = StepThreads(few=1, many=2)
    assert drive(policy, 50, {1: 1.0, 2: 0.1}, rows=6) == [1] * 50
    assert policy.steps == {}


def test_a_quiet_machine_keeps_every_core_and_tries_one_now_and_then():
    policy = StepThreads(few=1, many=2, interval=32)
    chosen = drive(policy, 400, {1: 1.0, 2: 0.8})
    assert policy.chosen == 2
    # measured once each way, then trials of 3 steps, each lost one doubling the wait
    # before the next (32 -> 64, 128, 256 steps)
    trials = [i for i, t in enumerate(chosen) if t == 1 and chosen[i - 1] == 2]
    assert chosen[0] == 2 and trials == [1, 4 + 64, 4 + 64 + 3 + 128]
    assert chosen.count(1) == 3 * len(trials)


def test_a_busy_core_sends_the_steps_back_to_one_thread_and_a_quiet_one_brings_them_back():
    policy = StepThreads(few=1, many=2, interval=8, max_interval=64)
    drive(policy, 100, {1: 1.0, 2: 0.8})
    assert policy.chosen == 2
    busy = drive(policy, 600, {1: 1.0, 2: 5.0})  # another program took a core: two threads stall
    assert policy.chosen == 1
    assert busy[-300:].count(2) <= 300 // 64 + 1  # one-step trials (each given up), at most every max_interval
    quiet = drive(policy, 100, {1: 1.0, 2: 0.8})
    assert policy.chosen == 2 and quiet[-20:].count(2) >= 17  # at most one trial of one thread


def test_one_core_means_nothing_to_choose():
    policy = StepThreads(few=1, many=1)
    assert drive(policy, 20, {1: 1.0}) == [1] * 20
    assert policy.steps == {}
