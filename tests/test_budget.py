"""Time-budget mode: the plan's rules, a run that ends with its minutes, resume and Continue."""
import math
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from engine.app import cli
from engine.data.sources import open_source
from engine.folder.model_folder import ModelFolder
from engine.training import budget
from engine.training.events import Notice, RunEnded, StepDone, Tokenizing
from engine.training.loop import TrainingLoop
from engine.training.runs import StopFlag, StopReason
from trainer import Trainer

from conftest import ROOT, TINY_CLI, TINY_MODEL, TINY_TRAIN

GFLOPS = 1e9


def plan(minutes, flop_rate=100 * GFLOPS, data_tokens=300_000, **kw):
    return budget.plan_budget(minutes, flop_rate, data_tokens, 8000, 8, **kw)


def test_more_time_never_buys_a_smaller_model():
    shapes = [plan(m).shape for m in (1, 3, 10, 30, 100, 300, 1000)]
    sizes = [s.block_params for s in shapes]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    fast = plan(10, flop_rate=10_000 * GFLOPS).shape  # a GPU's rate buys a bigger model in the same time
    assert fast.block_params > plan(10).shape.block_params


def test_the_chosen_shape_sees_its_share_of_tokens():
    for minutes in (3, 10, 30):
        p = plan(minutes)
        assert p.planned_tokens >= budget.TOKENS_PER_PARAM * p.shape.block_params
        bigger = [budget.Shape(d, n, h) for d, n, h in budget.LADDER if 12 * n * d * d > p.shape.block_params]
        if bigger:  # the next size up would not have had enough time
            assert plan(minutes, pinned=bigger[0]).planned_tokens < budget.TOKENS_PER_PARAM * bigger[0].block_params
        assert p.shape.d_model % p.shape.n_head == 0
        assert p.planned_tokens == pytest.approx(p.tokens_per_s * minutes * 60, rel=1e-6)


def test_dropout_follows_the_passes_over_the_data():
    lots_of_data = plan(3, data_tokens=100_000_000)
    little_data = plan(30, data_tokens=50_000)
    assert lots_of_data.passes < 1.5 and lots_of_data.dropout == 0.0
    assert little_data.passes > 8 and little_data.dropout == 0.2


def test_a_pinned_shape_is_kept_and_bad_budgets_are_refused():
    compact = budget.Shape(256, 4, 4)
    assert plan(30, pinned=compact).shape == compact
    for minutes in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="positive number of minutes"):
            plan(minutes)
    assert "time budget 3 min" in plan(3).describe() and "passes over the 300,000 tokens" in plan(3).describe()


@pytest.mark.parametrize("answer, expected", [("", (3, 0.0)), ("7", (7, 0.0)), ("10m", (3, 10.0)),
                                              ("2.5 min", (3, 2.5)), (" 1 Minutes ", (3, 1.0))])
def test_the_length_question_takes_epochs_or_minutes(answer, expected):
    length = cli.parse_training_length(answer, 3)
    assert (length.epochs, length.minutes) == expected


@pytest.mark.parametrize("answer", ["0m", "-2m", "xm", "nanm", "infm", "1e9m", "0", "abc", "3 epochs"])
def test_the_length_question_refuses_nonsense_in_one_line(answer):
    with pytest.raises(ValueError) as info:
        cli.parse_training_length(answer, 3)
    assert "\n" not in str(info.value) and repr(answer.strip().lower()) in str(info.value)


def test_probe_measures_a_positive_rate():
    from engine.runtime import hardware

    rate = budget.probe_flop_rate(hardware.detect_runtime("cpu", "fp32"), 320, 2, budget.Shape(32, 1, 2, 32), 0.2)
    assert 0 < rate < math.inf  # how large depends on the machine


STEP_S = 0.1  # seconds the fake clock moves per training step


class StepClock:
    """A clock for the Trainer that moves ``STEP_S`` per training step and never otherwise.

    It advances when the Trainer reports a step (``StepDone``), so tokenizing, probing and
    evaluating take no time on it: a budget run ends after the same steps on any machine.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def listening(self, on_event=lambda event: None):
        def on_each(event):
            on_event(event)
            if isinstance(event, StepDone):
                self.now += STEP_S
        return on_each


@pytest.fixture
def fixed_rate(monkeypatch):
    """The machine's probe answers a fixed FLOP rate: the plan's first guess no longer depends on the CPU."""
    monkeypatch.setattr(budget, "probe_flop_rate", lambda *args, **kwargs: 1e8)


def budget_trainer(folder, clock=time.monotonic, **train):
    return Trainer(str(folder), "bpe", model_overrides=TINY_MODEL, train_overrides={**TINY_TRAIN, **train},
                   clock=clock)


def test_a_budget_run_ends_with_its_minutes_and_a_decayed_schedule(tmp_path, sample_file, fixed_rate):
    clock = StepClock()
    trainer = budget_trainer(tmp_path / "m", clock)
    events = []
    result = trainer.train(open_source(str(sample_file)), 1, clock.listening(events.append), minutes=0.12)
    run = trainer.progress.run
    assert result.stopped_early is StopReason.FINISHED and result.stopped_early == ""
    assert run.finished and run.budget_s == pytest.approx(7.2)
    # The clock moved only with the steps; the run stopped at its deadline, which leaves
    # the final evaluation about a second (1 s and a third of a step per evaluation batch).
    assert run.spent_s == pytest.approx(result.steps * STEP_S)
    assert 7.2 - 1.5 < run.spent_s <= 7.2
    assert run.epochs > 1 and trainer.progress.epochs_done > 1  # the clock ended it, not one epoch
    assert result.final_eval is not None and result.final_eval.bpb > 0
    lrs = [s.lr for s in trainer.history.steps]
    peak = trainer.config.learning_rate
    assert max(lrs) == pytest.approx(peak, rel=0.05)  # warmed up to the peak ...
    assert lrs[-1] < 0.5 * peak  # ... and decayed as the time ran out
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert any(n.startswith("time budget 0.12 min") for n in notices)  # the plan is told before training
    saved = ModelFolder(str(tmp_path / "m")).read_meta()
    assert saved.model.d_model == TINY_MODEL["d_model"]  # sizes the user gave are kept
    # Every pass was evaluated, and the run ends with weights no worse than any of them.
    evals = trainer.history.evals
    assert len(evals) >= trainer.progress.epochs_done + 1
    assert result.final_eval.val_loss <= min(e.val_loss for e in evals[:-1])


def test_a_budget_run_on_the_real_clock_finishes(tmp_path, sample_file, fixed_rate):
    """End to end on time.monotonic: whatever this machine's speed, the run ends finished and evaluated."""
    events = []
    trainer = budget_trainer(tmp_path / "m")
    result = trainer.train(open_source(str(sample_file)), 1, events.append, minutes=0.02)
    run = trainer.progress.run
    assert result.stopped_early == "" and run.finished and run.budget_s == pytest.approx(1.2)
    assert result.final_eval is not None and run.spent_s > 0
    assert isinstance(events[-1], RunEnded) and events[-1].stopped is StopReason.FINISHED


def test_a_budget_run_tokenizes_its_text_once(tmp_path, sample_file, fixed_rate, monkeypatch):
    """The plan needs the data's size before the model exists; the tokens it counted are the ones trained on."""
    from engine.data.tokenizer import BPETokenizer

    encoded = []
    real_encode_batch = BPETokenizer.encode_batch

    def counting(self, texts):
        encoded.extend(texts)
        return real_encode_batch(self, texts)

    monkeypatch.setattr(BPETokenizer, "encode_batch", counting)
    clock, budget_events = StepClock(), []
    budget_trainer(tmp_path / "budget", clock).train(open_source(str(sample_file)), 1,
                                                     clock.listening(budget_events.append), minutes=0.02)
    in_budget_run, encoded[:] = list(encoded), []
    epoch_events = []
    budget_trainer(tmp_path / "epochs").train(open_source(str(sample_file)), 1, epoch_events.append)
    assert [type(e) for e in budget_events].count(Tokenizing) == 1
    assert [type(e) for e in epoch_events].count(Tokenizing) == 1
    assert in_budget_run and in_budget_run == encoded  # the same text, encoded once in each run


def test_best_weights_are_kept_and_restored_only_when_strictly_better(tiny_model):
    from engine.folder.records import EvalResult
    from engine.training.runs import BestWeights

    def ev(loss):
        return EvalResult(val_loss=loss, perplexity=2.0, bpb=loss, val_tokens=10)

    best = BestWeights()
    assert not best.beats(ev(9.0))  # nothing kept yet
    best.offer(tiny_model, ev(2.0))
    kept = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    best.offer(tiny_model, ev(2.5))  # worse: not kept
    assert best.beats(ev(2.5)) and not best.beats(ev(2.0)) and best.result.val_loss == 2.0
    best.restore(tiny_model)
    assert all(torch.equal(v, kept[k]) for k, v in tiny_model.state_dict().items())


def test_an_interrupted_budget_run_resumes_with_the_time_it_has_left(tmp_path, sample_file, fixed_rate):
    folder = tmp_path / "m"
    stop = StopFlag()
    clock = StepClock()
    first = budget_trainer(folder, clock)

    def stop_after_a_few_steps(event):
        if isinstance(event, StepDone) and event.step == 5:
            stop.set("interrupted")

    result = first.train(open_source(str(sample_file)), 1, clock.listening(stop_after_a_few_steps), stop,
                         minutes=0.08)
    assert result.stopped_early is StopReason.INTERRUPTED and result.stopped_early == "interrupted"
    spent = first.progress.run.spent_s
    assert spent == pytest.approx(4 * STEP_S)  # counted after step 5, before the clock moved past it
    assert not first.progress.run.finished

    later = StepClock(start=50_000.0)  # another process: its own clock
    again = budget_trainer(folder, later)
    result = again.resume(later.listening())
    run = again.progress.run
    assert result.resumed and result.stopped_early == "" and run.finished
    assert run.budget_s == pytest.approx(4.8) and run.spent_s == pytest.approx(spent + result.steps * STEP_S)
    assert spent + 4.8 - 1.5 < run.spent_s <= 4.8 + spent  # the time left, less the final evaluation's reserve
    assert result.global_step == 5 + result.steps


def test_train_then_continue_by_minutes_on_the_command_line(tmp_path, sample_file):
    folder = tmp_path / "m"
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "train", str(sample_file), "--minutes", "0.05",
                           "--target-vocab-size", "320", "--model-dir", str(folder)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "time budget 0.05 min" in out and "Training complete" in out
    meta = ModelFolder(str(folder)).read_meta()
    # The shape depends on how fast this machine is; the model must be the one the plan named.
    planned = re.search(r"d_model (\d+), (\d+) layers, (\d+) heads", out)
    shape = (meta.model.d_model, meta.model.n_layer, meta.model.n_head)
    assert planned and tuple(map(int, planned.groups())) == shape and shape in budget.LADDER
    steps_before = meta.progress.step

    more = tmp_path / "more.txt"
    more.write_text("A second text about the harbour and its boats.\n" * 80, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "continue", str(more), "--minutes", "0.05",
                           "--no-expand-vocab", "--model-dir", str(folder)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    later = ModelFolder(str(folder)).read_meta()
    # On the real clock: how many steps 3 s allow depends on the machine (none is possible), so
    # the second run shows in the runs below, and the step count never goes back.
    assert later.progress.step >= steps_before
    assert later.model == meta.model  # a model keeps its size when it goes on
    runs = ModelFolder(str(folder)).status().runs
    assert [r.minutes for r in runs] == [0.05, 0.05] and runs[-1].name.endswith("more.txt")

    bad = subprocess.run([sys.executable, str(ROOT / "interface.py"), "train", str(sample_file), "--minutes", "-1",
                          "--model-dir", str(tmp_path / "n")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "a time budget is a number of minutes" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_menu_asks_for_a_length_and_explains_a_bad_one(tmp_path, sample_file):
    lines = ["bpe", "1", "1", str(sample_file), "ten minutes", "0.05m", "6", "5"]
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "--model-dir", str(tmp_path / "m"), *TINY_CLI],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "Training length: epochs, or minutes such as 10m" in out
    assert "Invalid length: a time budget is a number of minutes" in out
    assert "time budget 0.05 min" in out and "Training complete" in out and "Traceback" not in out


@pytest.mark.parametrize("n_tokens, window", [(100, 32), (1000, 32), (30_000, 256), (60, 256)])
def test_val_batch_count_matches_what_evaluation_runs(n_tokens, window):
    """The budget keeps time for the final evaluation from this count."""
    import numpy as np

    from engine.data.windows import TokenDataset

    data = TokenDataset(np.arange(n_tokens, dtype=np.uint16) % 300, window, 0.05)
    for batch in (1, 4, 8):
        for most in (2, 50):
            assert data.val_batch_count(batch, most) == sum(1 for _ in data.val_batches(batch, most))


def test_settings_the_user_gave_win_over_the_plan_and_the_plan_says_so(tmp_path, sample_file, fixed_rate):
    clock = StepClock()
    trainer = Trainer(str(tmp_path / "m"), "bpe", model_overrides={**TINY_MODEL, "dropout": 0.05},
                      train_overrides={**TINY_TRAIN, "learning_rate": 3e-3}, clock=clock)
    events = []
    trainer.train(open_source(str(sample_file)), 1, clock.listening(events.append), minutes=0.05)
    plan_line = next(e.text for e in events if isinstance(e, Notice) and e.text.startswith("time budget"))
    assert "learning rate 0.003" in plan_line and "dropout 0.05" in plan_line
    assert trainer.model.config.dropout == 0.05 and trainer.config.learning_rate == 3e-3


def test_a_budget_run_that_gets_worse_ends_with_its_best_pass(tmp_path, sample_file, fixed_rate, monkeypatch):
    """The wiring of the best-pass rule: the held-out losses are made to rise after pass 1
    (a real tiny run does not overfit on cue); the weights saved are those of pass 1."""
    clock = StepClock()
    trainer = budget_trainer(tmp_path / "m", clock)
    real_evaluate = TrainingLoop.evaluate
    seen = {}

    def rising(self, dataset, run, partial_epoch=False):
        result = real_evaluate(self, dataset, run, partial_epoch)
        n = len(seen)
        seen[n] = {k: v.detach().clone() for k, v in self.state.model.state_dict().items()}
        return replace(result, val_loss=1.0 + n, bpb=1.0 + n)

    monkeypatch.setattr(TrainingLoop, "evaluate", rising)
    events = []
    result = trainer.train(open_source(str(sample_file)), 1, clock.listening(events.append), minutes=0.12)
    assert len(seen) == trainer.progress.epochs_done + 1 >= 3  # every pass, and the end of the budget
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert any(n.startswith("kept the weights of pass 1 (held-out 1.0000 bits/byte") for n in notices)
    assert result.final_eval.bpb == 1.0 and result.final_eval.step == trainer.progress.step
    model, _, _ = ModelFolder(str(tmp_path / "m")).load_model()
    assert all(torch.equal(v, seen[0][k]) for k, v in model.state_dict().items())
    assert ModelFolder(str(tmp_path / "m")).status().last_eval.bpb == 1.0
