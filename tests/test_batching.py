"""Continuous batching: many requests share each forward pass, and each gets what it would alone.

The scheduler in this process first (every step can be watched: what each sequence
fed, when each joined and left), then the real server process under 16 concurrent
clients of the official ``openai`` package. A request's tokens must not depend on the
company it keeps; that holds bit for bit where the Decoder is batch-invariant (fp16
weights on the CPU: engine/model/decoder.py), which these tests need.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import openai
import pytest

from engine.data.chat_format import Message
from engine.generation.sampling import GenerationConfig
from engine.generation.token_loop import FinishReason
from engine.runtime import hardware
from engine.serving.batching import BatchScheduler
from engine.serving.job_queue import GenerationWorker, QueueFull
from engine.serving.jobs import Failed, Finished, Job, Piece, Started, WorkerCounts
from response_generator import ResponseGenerator

from conftest import SAMPLE_TEXT, TINY_MODEL, TINY_TRAIN

pytestmark = pytest.mark.skipif(not hardware.cpu_half_weights_available(),
                                reason="bit-identical batching needs the fp16-weight kernel (FBGEMM)")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    from engine.data.sources import source_from_text
    from trainer import Trainer

    folder = tmp_path_factory.mktemp("batching-llama") / "model"
    Trainer(str(folder), "bpe", model_overrides={**TINY_MODEL, "arch": "llama"}, train_overrides=TINY_TRAIN).train(
        source_from_text(SAMPLE_TEXT), 1)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def generator(request, trained_once, llama_folder) -> ResponseGenerator:
    folder = trained_once("bpe", 1) if request.param == "gpt2" else llama_folder
    gen = ResponseGenerator(str(folder))
    assert gen.runtime.decode_weights is not None  # fp16 weights: the batch-invariant path
    return gen


class FakeJob:
    """What the scheduler needs of a ``Job``, recording its events in this thread."""

    def __init__(self, start) -> None:
        self.start = start
        self.events: list = []
        self.cancelled = False

    def emit(self, event) -> None:
        self.events.append(event)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Piece))

    @property
    def finished(self) -> Finished | None:
        return next((e for e in self.events if isinstance(e, Finished)), None)


class WatchedDecoder:
    """The scheduler's Decoder, with the ids each step fed, sequence by sequence."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.steps: list[list[int]] = []  # per step: how many ids each sequence fed

    def new_cache(self):
        return self.decoder.new_cache()

    def step_many(self, feeds):
        self.steps.append([len(f.ids) for f in feeds])
        return self.decoder.step_many(feeds)


# Requests unlike each other in every setting a request carries.
def requests() -> list:
    """(kind, prompt or messages, settings, stop strings) for 16 requests."""
    words = ["river", "orchard", "student", "storm", "miller", "bees", "trains", "boats"]
    out = []
    for i in range(16):
        cfg = GenerationConfig(max_new_tokens=6 + i % 5 * 3, temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
                               top_k=[0, 5, 40, 200][i // 4], top_p=[1.0, 0.9, 0.6][i % 3],
                               repetition_penalty=[1.0, 1.3][i % 2], seed=100 + i)
        stops = ("e",) if i % 7 == 3 else ()
        if i % 2:
            out.append(("chat", [Message("user", f"Tell me about the {words[i % 8]}.")], cfg, stops))
        else:
            out.append(("complete", f"The {words[i % 8]} " * (1 + i % 3), cfg, stops))
    return out


def job_for(kind, prompt, cfg, stops) -> FakeJob:
    # As routes.py builds them: a function of the model's prompt builder.
    if kind == "chat":
        return FakeJob(lambda prompts: prompts.chat(prompt, cfg, stops))
    return FakeJob(lambda prompts: prompts.complete(prompt, cfg, stops))


def run_all(scheduler: BatchScheduler, jobs: list[FakeJob], join_at: list[int] | None = None) -> int:
    """Admit each job at its step (all at once by default) and step until all have left; the steps taken."""
    join_at = join_at or [0] * len(jobs)
    steps = 0
    while steps <= max(join_at) or scheduler.active:
        for job, at in zip(jobs, join_at):
            if at == steps:
                scheduler.admit(job)
        scheduler.step()
        steps += 1
        assert steps < 500
    return steps


def alone(generator, reqs, **kw) -> list[FakeJob]:
    out = []
    for r in reqs:
        scheduler = BatchScheduler(generator, WorkerCounts(), **kw)
        run_all(scheduler, [job := job_for(*r)])
        out.append(job)
    return out


def test_sixteen_requests_together_get_what_each_gets_alone(generator):
    reqs = requests()
    solo = alone(generator, reqs)
    counts = WorkerCounts()
    scheduler = BatchScheduler(generator, counts)
    together = [job_for(*r) for r in reqs]
    run_all(scheduler, together, join_at=[i // 3 for i in range(16)])  # a few join each step
    for a, b in zip(solo, together):
        assert b.events == a.events  # Started (notices), the same pieces, Finished (usage, reason)
    assert {e.finish_reason for j in together for e in j.events if isinstance(e, Finished)} >= {
        FinishReason.LENGTH, FinishReason.STOP}
    assert counts.finished == 16 and counts.cancelled == counts.failed == 0
    assert counts.completion_tokens == sum(j.finished.completion_tokens for j in together)
    # and what the menu gets: ResponseGenerator runs the same prompts through the same loop
    for (kind, prompt, cfg, stops), job in zip(reqs, together):
        menu = generator.chat(prompt, cfg, stops) if kind == "chat" else generator.complete(prompt, cfg, stops)
        assert "".join(menu) == job.text


def test_steps_on_two_threads_give_each_request_what_it_gets_alone(generator, monkeypatch):
    # The server's StepThreads moves big steps to every core; a request's tokens must not
    # notice: the products of 16 rows and more take FBGEMM's threaded call, the top-k
    # and the attention split their rows and heads over the threads.
    import torch

    from engine.serving.step_threads import StepThreads

    reqs = requests()
    solo = alone(generator, reqs)
    calls = []
    real = torch.ops.quantized.linear_dynamic_fp16
    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", lambda *a: calls.append(1) or real(*a))
    threads = torch.get_num_threads()
    policy = StepThreads(few=1, many=2, min_rows=2, interval=4)
    try:
        scheduler = BatchScheduler(generator, WorkerCounts(), threads=policy)
        together = [job_for(*r) for r in reqs]
        run_all(scheduler, together, join_at=[i // 3 for i in range(16)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(solo, together):
        assert b.events == a.events
    assert policy.steps[2] > 0 and policy.steps[1] > 0 and calls  # both settings ran, and the threaded call


def test_a_cancelled_request_leaves_without_disturbing_the_others(generator):
    reqs = requests()[:6]
    solo = alone(generator, reqs)
    counts = WorkerCounts()
    scheduler = BatchScheduler(generator, counts)
    jobs = [job_for(*r) for r in reqs]
    for job in jobs:
        scheduler.admit(job)
    scheduler.step()
    scheduler.step()
    jobs[2].cancel()  # its client has gone
    while scheduler.active:
        scheduler.step()
    assert jobs[2].finished.finish_reason is FinishReason.CANCELLED
    for i in (0, 1, 3, 4, 5):
        assert jobs[i].events == solo[i].events
    assert counts.cancelled == 1 and counts.finished == 5


def test_a_long_prompt_is_fed_in_chunks_between_the_streams_steps(generator):
    """Prompt ids per step stay within the budget (or one chunk), and every reply already
    generating advances at every step while the long prompts are fed."""
    chunk, budget = 5, 8
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.8, seed=3)
    long_prompt = "the old mill and the orchard " * 4
    reqs = [("complete", "The river", cfg, ())] * 3 + [("complete", long_prompt, cfg, ())] * 2 + [
        ("chat", [Message("user", "Hi")], cfg, ())]
    solo = alone(generator, reqs, prefill_chunk=chunk, prefill_budget=budget)
    scheduler = BatchScheduler(generator, WorkerCounts(), prefill_chunk=chunk, prefill_budget=budget)
    watched = scheduler.decoder = WatchedDecoder(scheduler.decoder)
    jobs = [job_for(*r) for r in reqs]
    for job in jobs[:3]:
        scheduler.admit(job)
    while not all(a.reply.loop.produced for a in scheduler.active):  # the short prompts: a step or two
        scheduler.step()
    generating = [a.reply for a in scheduler.active]
    for job in jobs[3:]:
        scheduler.admit(job)
    produced = [r.loop.produced for r in generating]
    while scheduler.active:
        scheduler.step()
        fed = watched.steps[-1]
        prompt_ids = [n for n in fed if n > 1]
        assert sum(prompt_ids) <= budget or len(prompt_ids) == 1
        assert max(fed) <= chunk
        for i, r in enumerate(generating):  # every reply already generating took a token
            if not r.done:
                assert r.loop.produced == produced[i] + 1
            produced[i] = r.loop.produced
    assert len(generator.tokenizer.encode(long_prompt)) > 3 * budget  # the long ones really took several steps
    assert [j.events for j in jobs] == [j.events for j in solo]


def test_requests_beyond_the_batch_wait_and_a_full_queue_refuses(generator):
    """max_batch at once, the rest in the queue (/health's "waiting"); beyond max_waiting, QueueFull."""
    async def scenario() -> tuple[list, list]:
        release = threading.Event()
        worker = GenerationWorker(lambda: release.wait(30) and generator, max_waiting=3, max_batch=2)
        cfg = GenerationConfig(max_new_tokens=8, seed=1)
        jobs = [Job(lambda prompts, i=i: prompts.complete(f"The river {i}", cfg)) for i in range(4)]
        for job in jobs[:3]:
            worker.submit(job)
        with pytest.raises(QueueFull):
            worker.submit(jobs[3])
        waiting = [worker.waiting, jobs[0].answering()]  # nothing answered while the model loads
        worker.start()
        release.set()
        events, answering = [], []
        for job in jobs[:3]:
            got = []
            while not got or not isinstance(got[-1], (Finished, Failed)):
                got.append(await asyncio.wait_for(job.events.get(), 30))
                answering.append(job.answering())  # what paces its text: the worker's count
            events.append(got)
        worker.close()
        return waiting + [worker.counts.finished, worker.counts.failed, max(answering)], events

    counts, events = asyncio.run(scenario())
    assert counts[:4] == [3, 0, 3, 0] and 1 <= counts[4] <= 2  # max_batch 2: never more answered at once
    for got in events:
        assert isinstance(got[0], Started) and isinstance(got[-1], Finished)
        assert got[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_a_request_that_cannot_be_built_fails_alone(generator):
    counts = WorkerCounts()
    scheduler = BatchScheduler(generator, counts)
    good = job_for("complete", "The river", GenerationConfig(max_new_tokens=5, seed=2), ())
    bad = FakeJob(lambda prompts: prompts.chat([Message("assistant", "no user turn")], GenerationConfig()))
    run_all(scheduler, [good, bad])
    assert isinstance(bad.events[0], Failed) and bad.events[0].user_error
    assert good.finished is not None and counts.failed == 1 and counts.finished == 1


# -- the real server, 16 clients at once --------------------------------------------------------

@pytest.fixture(scope="module")
def server(trained_once, tmp_path_factory):
    from test_server import running_server

    log = tmp_path_factory.mktemp("batching-server") / "stderr.log"
    with running_server(trained_once("bpe", 1), "--api-key", "k", log=log) as running:
        yield running
    assert "Traceback" not in log.read_text(), log.read_text()


def ask(server, i: int) -> str:
    """Request i of 16: chat or completion, streamed or not, each with its own settings and seed."""
    client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0, timeout=120)
    chat, stream = i % 2 == 0, i % 4 < 2
    common = dict(model=server.model, max_tokens=8 + i % 4 * 4, seed=1000 + i, temperature=[0.5, 0.9, 1.2][i % 3],
                  top_p=[1.0, 0.8][i % 2], stop=["\n\n"] if i % 5 == 0 else None,
                  extra_body={"top_k": [20, 0, 50, 5][i % 4], "repetition_penalty": [1.0, 1.2][i % 2]})
    if chat:
        reply = client.chat.completions.create(messages=[{"role": "user", "content": f"Question {i}: the mill?"}],
                                               stream=stream, **common)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
        return reply.choices[0].message.content
    reply = client.completions.create(prompt=f"The river {i} ran", stream=stream, **common)
    if stream:
        return "".join(c.choices[0].text for c in reply)
    return reply.choices[0].text


def test_sixteen_concurrent_clients_get_what_each_gets_alone(server):
    alone_texts = [ask(server, i) for i in range(16)]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(server, i))) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [together.get(i) for i in range(16)] == alone_texts
    assert len(set(alone_texts)) > 8  # the requests really differ
