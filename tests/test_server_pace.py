"""How the server spends its two kinds of work: threads per step (every core while measured
faster, one when not) and how often a stream's text is handed to the event loop."""
from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading

import pytest
import torch

from engine.runtime import hardware
from engine.serving.job_queue import GenerationWorker
from engine.serving.jobs import TEXT_INTERVAL_S, Job, Piece, Started, text_interval
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


def test_text_is_handed_over_less_often_the_more_streams_there_are():
    assert text_interval(0) == text_interval(1) == text_interval(4) == TEXT_INTERVAL_S == 0.02
    assert text_interval(8) == 0.04 and text_interval(16) == 0.08
    assert text_interval(32) == text_interval(1000) == 0.1  # never choppier than 10 updates a second


def test_a_job_among_sixteen_streams_waits_the_longer_interval_between_pieces():
    async def run() -> list[tuple[float, object]]:
        loop = asyncio.get_running_loop()
        job = Job(lambda prompts: None)
        job.answering = lambda: 16
        got = []

        async def take() -> None:
            event = await asyncio.wait_for(job.events.get(), 5)
            got.append((loop.time(), event))

        job.emit(Started([]))
        await take()
        before_first = loop.time()  # the first piece is handed over after this
        job.emit(Piece("a"))  # the first text goes at once
        await take()
        job.emit(Piece("b"))  # waits for the interval; "c" joins it meanwhile
        job.emit(Piece("c"))
        await take()
        return before_first, got

    before_first, [(_, started), (_, first), (t_rest, rest)] = asyncio.run(run())
    assert (started, first, rest) == (Started([]), Piece("a"), Piece("bc"))
    # A timer never fires early (by more than the clock's resolution), so the rest came at
    # least the interval after the first piece was handed over, which was after
    # ``before_first``: a bound that no slow machine breaks.
    assert t_rest - before_first >= text_interval(16) - 1e-6


def test_the_servers_worker_hides_what_it_loaded_from_the_garbage_collector():
    class Loaded:  # what the scheduler reads of a ResponseGenerator
        prompts = tokenizer = None
        context = 16

        def decoder(self):
            return None

    assert gc.get_freeze_count() == 0
    counts = []
    try:
        for freeze in (False, True):
            loaded = threading.Event()
            worker = GenerationWorker(Loaded, max_waiting=1, on_loaded=lambda error: loaded.set(),
                                      freeze_loaded=freeze)
            worker.start()
            assert loaded.wait(30) and worker.error is None
            counts.append(gc.get_freeze_count())
            worker.close()
    finally:
        gc.unfreeze()  # this test process goes on loading and dropping models
    assert counts[0] == 0 and counts[1] > 1000  # the modules loaded so far, at the least


def _os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _helpers_of_a_parallel_operation() -> set[str]:
    """Run one two-thread tensor operation on this thread: the OS threads it started."""
    before = _os_threads()
    big = torch.ones(1 << 20)
    torch.add(big, big)  # a million elements: split over the threads by OpenMP
    return _os_threads() - before


@pytest.fixture
def openmp_helpers():
    """This thread's OpenMP helpers, started by a parallel operation on two threads."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("OpenMP helper threads are released only for Linux's GNU OpenMP")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hardware.release_cpu_threads_of_this_thread()  # whatever this thread had before
        helpers = _helpers_of_a_parallel_operation()
        if not helpers:
            pytest.skip("this PyTorch ran the operation without starting an OpenMP helper")
        yield helpers
    finally:
        torch.set_num_threads(threads)


def test_a_thread_can_let_go_of_its_openmp_helpers(openmp_helpers):
    assert openmp_helpers <= _os_threads()
    assert hardware.release_cpu_threads_of_this_thread()
    assert not openmp_helpers & _os_threads(), "the helpers still run"
    # Parallel work on this thread afterwards starts a team again, and computes as before.
    again = _helpers_of_a_parallel_operation()
    assert again and torch.equal(torch.ones(1 << 20) * 2, torch.ones(1 << 20) + torch.ones(1 << 20))


def test_starting_the_worker_lets_go_of_the_callers_openmp_helpers(openmp_helpers):
    # Two teams on a 2-core machine make every parallel operation of the worker wake its
    # helpers from sleep (hardware.release_cpu_threads_of_this_thread says how much that cost).
    def broken():
        raise ValueError("no model here")

    worker = GenerationWorker(broken, max_waiting=1)
    worker.start()
    worker.close()
    assert worker.state.value == "failed"
    assert not openmp_helpers & _os_threads(), "the caller's helpers outlived the worker's start"
