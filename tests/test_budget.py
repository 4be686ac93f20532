"""Time-budget mode: the plan's rules, a run that ends with its minutes, resume and Continue."""
import math
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.app import cli
from engine.data.sources import open_source, source_from_text
from engine.folder.model_folder import ModelFolder
from engine.model.config import ModelConfig
from engine.runtime import hardware
from engine.training import budget
from engine.training import config as training_config
from engine.training.config import Recipe, TrainConfig
from engine.training.events import Notice, RunEnded, RunStarted, StepDone, TokenizerTraining, Tokenizing
from engine.training.loop import TrainingLoop
from engine.training.planning import Planner
from engine.training.runs import StopFlag, StopReason
from engine.training.step import MuonAdamW
from trainer import Trainer

from conftest import ROOT, TINY_CLI, TINY_MODEL, TINY_TRAIN

GFLOPS = 1e9
PROBED = ModelConfig(vocab_size=320, d_model=32, n_layer=1, n_head=2, context=32)  # a model the probe times fast


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


@pytest.mark.parametrize("arch, optimizer", [("gpt2", "adamw"), ("llama", "muon")])
def test_probe_measures_a_positive_rate(arch, optimizer):
    from engine.runtime import hardware
    from engine.training.config import TrainConfig

    model = replace(PROBED, arch=arch, qk_norm=arch == "llama")
    rate = budget.probe_flop_rate(hardware.detect_runtime("cpu", "fp32"), model, 2, TrainConfig(optimizer=optimizer),
                                  0.2)
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


def rising_evaluations(monkeypatch) -> dict:
    """Held-out losses that rise with every evaluation (1.0, 2.0, ...), each evaluation's weights
    recorded by its number: a real tiny run does not overfit on cue."""
    real_evaluate = TrainingLoop.evaluate
    seen = {}

    def rising(self, dataset, run, partial_epoch=False):
        result = real_evaluate(self, dataset, run, partial_epoch)
        n = len(seen)
        seen[n] = {k: v.detach().clone() for k, v in self.state.model.state_dict().items()}
        return replace(result, val_loss=1.0 + n, bpb=1.0 + n)

    monkeypatch.setattr(TrainingLoop, "evaluate", rising)
    return seen


def test_a_budget_run_that_gets_worse_ends_with_its_best_pass(tmp_path, sample_file, fixed_rate, monkeypatch):
    """The wiring of the best-pass rule: the held-out losses are made to rise after pass 1
    (a real tiny run does not overfit on cue); the weights saved are those of pass 1."""
    clock = StepClock()
    trainer = budget_trainer(tmp_path / "m", clock)
    seen = rising_evaluations(monkeypatch)
    events = []
    result = trainer.train(open_source(str(sample_file)), 1, clock.listening(events.append), minutes=0.12)
    assert len(seen) == trainer.progress.epochs_done + 1 >= 3  # every pass, and the end of the budget
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert any(n.startswith("kept the weights of pass 1 (held-out 1.0000 bits/byte") for n in notices)
    assert result.final_eval.bpb == 1.0 and result.final_eval.step == trainer.progress.step
    model, _, _ = ModelFolder(str(tmp_path / "m")).load_model()
    assert all(torch.equal(v, seen[0][k]) for k, v in model.state_dict().items())
    assert ModelFolder(str(tmp_path / "m")).status().last_eval.bpb == 1.0


# -- conversations on a time budget ----------------------------------------------------------

def numbered_conversations(n: int):
    """``n`` short conversations, each naming its place in the set (one packed row each at context 32)."""
    from engine.data.chat_format import Message
    from engine.data.conversations import ConversationSource

    return ConversationSource("numbered", [[Message("user", f"Question {i}?"), Message("assistant", f"Answer {i}.")]
                                           for i in range(n)])


def recording_rows(monkeypatch):
    """The training rows of each batch a conversation run takes, in order (indices into ``train_ids``)."""
    from engine.data.chat_windows import ChatDataset

    rows = []
    real_train_batch = ChatDataset.train_batch

    def train_batch(self, plan, i):
        rows.extend(int(r) for r in plan.batch_windows(i))
        return real_train_batch(self, plan, i)

    monkeypatch.setattr(ChatDataset, "train_batch", train_batch)
    return rows


def test_a_conversation_budget_run_ends_with_its_minutes_and_is_saved(trained_copy, fixed_rate):
    """``finetune --minutes`` as the Trainer runs it: a budget, not 30 passes (it once started 30 x 1,958 steps)."""
    folder = trained_copy("bpe", 1)
    clock = StepClock()
    trainer = Trainer(str(folder), clock=clock)
    steps_before = ModelFolder(str(folder)).read_meta().progress.step
    events = []
    result = trainer.train_conversations(numbered_conversations(200), 30, clock.listening(events.append),
                                         minutes=0.05)
    run = trainer.progress.run
    assert result.stopped_early is StopReason.FINISHED and run.finished and run.kind == "chat"
    assert run.budget_s == pytest.approx(3.0) and run.spent_s == pytest.approx(result.steps * STEP_S)
    assert 3.0 - 1.5 < run.spent_s <= 3.0  # the time, less the final evaluation's reserve
    assert result.final_eval is not None and result.final_eval.step == trainer.progress.step
    lrs = [s.lr for s in trainer.history.steps[-result.steps:]]
    assert lrs[-1] < 0.5 * max(lrs)  # the schedule was fitted to the clock, not to 30 passes
    started = next(e for e in events if isinstance(e, RunStarted))
    assert 0 < started.minutes_left <= 0.05
    saved = ModelFolder(str(folder))
    assert saved.read_meta().progress.step == steps_before + result.steps and saved.read_meta().chat_tuned
    assert saved.read_meta().model == trainer.model.config  # the model keeps its size
    assert saved.status().runs[-1].minutes == 0.05


def test_a_conversation_budget_run_that_gets_worse_ends_with_its_best_pass(trained_copy, fixed_rate, monkeypatch):
    """The text test's wiring, on conversations: held-out losses made to rise after pass 1 leave pass 1's weights."""
    folder = trained_copy("bpe", 1)
    clock = StepClock()
    trainer = Trainer(str(folder), clock=clock)
    seen = rising_evaluations(monkeypatch)
    events = []
    result = trainer.train_conversations(numbered_conversations(20), 30, clock.listening(events.append),
                                         minutes=0.05)
    assert len(seen) == trainer.progress.run.epoch + 1 >= 3  # every pass, and the end of the budget
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert any(n.startswith("kept the weights of pass 1 (held-out 1.0000 bits/byte") and
               n.endswith("later passes over these conversations overfit it") for n in notices)
    assert result.final_eval.bpb == 1.0
    model, _, _ = ModelFolder(str(folder)).load_model()
    assert all(torch.equal(v, seen[0][k]) for k, v in model.state_dict().items())


def test_less_than_a_pass_trains_on_a_random_sample_and_the_held_out_split_stays(trained_once, tmp_path, fixed_rate,
                                                                                 monkeypatch):
    """Two budgets shorter than a pass over 200 conversations: each trains on rows drawn in one
    seeded shuffled order (the longer run sees more of the same order), never on the first rows
    in the data's order, and both hold out the same conversations."""
    from engine.data.chat_windows import ChatDataset
    from engine.data.conversations import split_conversations
    from engine.training.dataset_memory import dataset_id_of

    source = numbered_conversations(200)
    recorded = recording_rows(monkeypatch)
    rows, held_out, trained = [], [], []
    for minutes in (0.02, 0.04):
        folder = tmp_path / f"model-{minutes}"
        shutil.copytree(trained_once("bpe", 1), folder)
        clock = StepClock()
        trainer = Trainer(str(folder), clock=clock)
        trainer.train_conversations(source, 30, clock.listening(), minutes=minutes)
        rows.append(list(recorded))
        recorded.clear()
        run = trainer.progress.run
        data = ChatDataset.load(folder / "cache" / run.cache_file)
        assert run.epoch == 0 and len(rows[-1]) < len(data.train_ids)  # less than one pass
        record = next(r for r in ModelFolder(str(folder)).read_datasets() if r.id == dataset_id_of(run.cache_file))
        held_out.append((ModelFolder(str(folder)).read_dataset_texts(record).conversations, data.val_ids))
        texts = [trainer.tokenizer.decode(data.train_ids[r].tolist()) for r in rows[-1]]
        trained.append(sorted(int(n) for text in texts for n in re.findall(r"Question (\d+)", text)))
    first, second = rows
    assert len(set(first)) == len(first) and len(second) > len(first)
    assert second[:len(first)] == first  # one seeded order: a longer budget (or a resume) goes on with it
    assert sorted(first) != list(range(len(first)))  # not the first rows in the data's order ...
    assert min(trained[0]) < 50 and max(trained[0]) > 150  # ... but conversations from all over the set
    assert held_out[0][0] == held_out[1][0] and np.array_equal(held_out[0][1], held_out[1][1])
    _, expected = split_conversations(source.conversations, trainer.config.seed)
    assert held_out[0][0] == [list(conv) for conv in expected]  # every role and content
    held_out_numbers = {int(re.search(r"\d+", conv[0].content)[0]) for conv in expected}
    assert len(held_out_numbers) == 20 and not held_out_numbers & set(trained[1])  # never trained on


def test_finetune_by_minutes_on_the_command_line(trained_copy, tmp_path):
    """The real program, on the real clock: it ends finished and saved (how many steps fit depends on the machine)."""
    from engine.data.conversations import append_conversation

    folder = trained_copy("bpe", 1)
    chats = tmp_path / "chats.jsonl"
    for conv in numbered_conversations(40).conversations:
        append_conversation(chats, conv)
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "finetune", str(chats), "--minutes", "0.05",
                           "--model-dir", str(folder)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "Training complete" in out and "Traceback" not in out
    folder_now = ModelFolder(str(folder))
    assert folder_now.read_meta().chat_tuned
    assert folder_now.status().runs[-1].minutes == 0.05 and folder_now.status().runs[-1].kind == "chat"
    checkpoint = torch.load(folder / "checkpoint.pth", weights_only=True)
    run = checkpoint["state"]["run"]
    assert run["finished"] and run["budget_s"] == pytest.approx(3.0) and run["epochs"] < 100_000


def test_the_menu_takes_minutes_for_conversations(trained_copy, monkeypatch):
    """Train on Conversations asks the length question text training asks, so '2m' is a 2-minute budget."""
    import interface
    from engine.app.session import Session
    from engine.data.conversations import append_conversation

    folder = trained_copy("bpe", 1)
    asked = []
    monkeypatch.setattr(Session, "finetune_on", lambda self, source, length: asked.append(length))
    chats = folder.parent / "chats.jsonl"
    for conv in numbered_conversations(12).conversations:
        append_conversation(chats, conv)
    prompts = []
    answers = iter(["1", "5", str(chats), "two minutes", "2m", "6", "5"])

    def input_fn(prompt):
        prompts.append(prompt)
        return next(answers)

    out = []
    assert interface.main(["--model-dir", str(folder)], input_fn, out.append) == 0
    assert [(length.epochs, length.minutes) for length in asked] == [(30, 2.0)]
    assert "Training length: epochs, or minutes such as 10m for a time budget [default: 5 minutes]: " in prompts
    assert any("Invalid length: a time budget is a number of minutes" in line for line in out)


def test_a_default_length_in_minutes_works_in_the_menu_and_in_finetune(trained_once, tmp_path, monkeypatch, capsys):
    """DEFAULT_CHAT_LENGTH may become minutes: the menu's empty answer and ``finetune`` without flags take them."""
    import interface
    from engine.app import cli
    from engine.app.console import TrainingLength
    from engine.data.conversations import append_conversation

    default = TrainingLength(30, 0.02)
    monkeypatch.setattr(interface, "DEFAULT_CHAT_LENGTH", default)
    monkeypatch.setattr(cli, "DEFAULT_CHAT_LENGTH", default)
    chats = tmp_path / "chats.jsonl"
    for conv in numbered_conversations(12).conversations:
        append_conversation(chats, conv)
    for entry in ("menu", "finetune"):
        folder = tmp_path / entry
        shutil.copytree(trained_once("bpe", 1), folder)
        if entry == "menu":
            answers, prompts = iter(["1", "5", str(chats), "", "6", "5"]), []
            assert interface.main(["--model-dir", str(folder)], lambda p: prompts.append(p) or next(answers),
                                  lambda line="": None) == 0
            assert any(p.endswith("[default: 0.02 minutes]: ") for p in prompts)
        else:
            assert cli.main(["finetune", str(chats), "--model-dir", str(folder)]) == 0
            assert "Training complete" in capsys.readouterr().out
        last = ModelFolder(str(folder)).status().runs[-1]
        assert (last.kind, last.minutes) == ("chat", 0.02), entry


def test_the_probe_backs_off_like_training_when_a_batch_does_not_fit(monkeypatch):
    """Out of memory in the probe halves the micro-batch, as a training step does; the rate is then
    that of the step training will run. When one sequence does not fit, one line says what to do."""
    from engine.model.gpt import GPT
    from engine.runtime import hardware

    real_forward = GPT.forward
    rows_seen, fits = [], [2]

    def forward(self, idx, *args, **kwargs):
        rows_seen.append(idx.shape[0])
        if idx.shape[0] > fits[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)
    runtime = hardware.detect_runtime("cpu", "fp32")
    rate = budget.probe_flop_rate(runtime, PROBED, 8, seconds=0.05)
    assert 0 < rate < math.inf
    assert rows_seen[:3] == [8, 4, 2] and set(rows_seen[3:]) == {2}  # 4 micro-batches of 2 from then on
    fits[0] = 0
    with pytest.raises(MemoryError, match="even with one sequence per micro-batch while measuring"):
        budget.probe_flop_rate(runtime, PROBED, 8, seconds=0.05)


# -- the vocabulary a time budget plans, and the recipe its probe times --------------------------

def varied_text(n_words: int, seed: int = 0) -> str:
    """Text of made-up words (a few thousand of them): BPE finds well over a thousand merges in it."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    return "".join(rng.choice(words) + (".\n" if i % 12 == 11 else " ") for i in range(n_words))


def test_a_small_shape_gets_a_small_vocabulary_and_a_big_one_the_ceiling():
    small = budget.plan_vocabulary(3, 10 * GFLOPS, 8000)
    shape = budget.ladder_shape(3, 10 * GFLOPS, small)
    assert small < 8000 and shape.embedding_fits(small) and not shape.embedding_fits(2 * small)
    assert budget.plan_vocabulary(30, 10_000 * GFLOPS, 8000) == 8000  # d768 and up: 8,000 rows are a small share
    assert budget.plan_vocabulary(3, 10 * GFLOPS, 8000, pinned=budget.Shape(128, 2, 4)) == 1024
    assert budget.plan_vocabulary(3, 10 * GFLOPS, 8000, pinned=budget.Shape(256, 4, 4)) == 4096
    assert budget.plan_vocabulary(3, 10 * GFLOPS, 8000, pinned=budget.Shape(32, 1, 2)) == 1024  # none fits: the least


@pytest.mark.parametrize("ceiling", [300, 700, 1024, 1500, 2048, 5000, 8000, 50_000])
def test_the_planned_vocabulary_never_exceeds_the_ceiling(ceiling):
    for rate in (1, 10, 100, 1000, 100_000):
        for minutes in (1, 10, 100):
            size = budget.plan_vocabulary(minutes, rate * GFLOPS, ceiling)
            assert size <= ceiling and size in budget.vocabulary_candidates(ceiling)
            shape = budget.ladder_shape(minutes, rate * GFLOPS, size)  # the shape the plan then picks
            assert shape.embedding_fits(size) or size == budget.vocabulary_candidates(ceiling)[0]


def test_a_vocabulary_that_swings_between_two_sizes_takes_the_smaller(monkeypatch):
    """The bigger shape carries 4,096 tokens, whose head makes the budget buy the smaller shape,
    which carries 2,048: the plan stops there instead of going round."""
    big, small, asked = budget.Shape(256, 4, 4), budget.Shape(128, 4, 4), []
    monkeypatch.setattr(budget, "ladder_shape", lambda m, r, vocab, c=256: asked.append(vocab) or
                        (big if vocab <= 2048 else small))
    assert budget.plan_vocabulary(3, GFLOPS, 8000) == 2048
    assert asked == [8000, 2048, 4096]


def test_the_plan_chooses_the_vocabulary_unless_the_user_gave_one_and_says_so(monkeypatch):
    probed = []
    monkeypatch.setattr(budget, "probe_flop_rate", lambda runtime, model, *args: probed.append(model) or 10 * GFLOPS)
    runtime = hardware.detect_runtime("cpu", "fp32")
    planner = Planner(runtime)
    size = planner.budget_vocabulary(3, 10_000_000, TrainConfig())
    plan = planner.budget_plan(3, 300_000, size, TrainConfig())
    assert size == 2048 and plan.vocab_size == 2048 and plan.shape.embedding_fits(2048)
    assert "vocabulary 2,048 (its embedding within 33% of the block weights; up to 8,000 asked for)" in plan.describe()
    assert len(probed) == 1 and probed[0].vocab_size == 8000  # once, with the ceiling's head

    small_text = Planner(runtime)  # 100,000 bytes support 2,500 tokens: the ceiling, lowered
    small_text.flop_rate = 1000 * GFLOPS
    assert small_text.budget_vocabulary(3, 100_000, TrainConfig()) == 2500
    assert small_text.vocabulary.reason() == "the most the text supports, of 8,000 asked"

    probed.clear()
    pinned = Planner(runtime, train_overrides={"target_vocab_size": 5000})
    assert pinned.budget_vocabulary(3, 10_000_000, TrainConfig(target_vocab_size=5000)) == 5000
    assert pinned.vocabulary.reason() == "as asked" and probed == []  # kept, nothing measured for it
    assert Planner(runtime).budget_vocabulary(0, 10_000_000, TrainConfig()) is None  # epochs: as before


@pytest.mark.parametrize("pinned", [False, True])
def test_a_budget_run_trains_its_tokenizer_to_the_planned_vocabulary(tmp_path, monkeypatch, pinned):
    """A new model with a time budget: the tokenizer is trained to the plan's size (or the user's),
    the probe times the recipe, and the plan's notice says which vocabulary and why."""
    probed = []
    monkeypatch.setattr(budget, "probe_flop_rate",
                        lambda runtime, model, batch, config, seconds: probed.append((model, config)) or 1e8)
    train = {k: v for k, v in TINY_TRAIN.items() if k != "target_vocab_size"}
    if pinned:
        train["target_vocab_size"] = 600
    clock, events = StepClock(), []
    trainer = Trainer(str(tmp_path / "m"), "bpe", model_overrides=TINY_MODEL, train_overrides=train, clock=clock)
    trainer.train(source_from_text(varied_text(20_000)), 1, clock.listening(events.append), minutes=0.02)
    asked = next(e.vocab_size for e in events if isinstance(e, TokenizerTraining))
    plan_line = next(e.text for e in events if isinstance(e, Notice) and e.text.startswith("time budget"))
    if pinned:  # kept as the user gave it: no probe before the tokenizer
        assert asked == 600 and "vocabulary 600 (as asked)" in plan_line
    else:  # d32 x 1 carries no candidate within a third of its blocks: the smallest, 1,024
        assert asked == 1024 and "vocabulary 1,024 (its embedding within 33%" in plan_line
    assert trainer.tokenizer.vocab_size == asked == trainer.model.config.vocab_size
    assert not any(isinstance(e, Notice) and "lowered" in e.text for e in events)
    (model, config), = probed
    recipe = training_config.NEW_MODEL_RECIPE
    assert model.arch == recipe.arch and config.optimizer == recipe.optimizer
    assert model.context == TINY_MODEL["context"] and model.d_model == TINY_MODEL["d_model"]


def test_the_probe_times_the_recipe_the_run_trains_with(monkeypatch):
    """Its block design, QK-norm, optimizer (through make_optimizer), context and precision; not a
    GPT-2 block with AdamW at 256 tokens, whatever the run used."""
    timed = []

    def step(model, optimizer, x, y, lr, runtime, grad_clip, scaler=None, micro_batches=1):
        timed.append((model.config, type(optimizer), tuple(x.shape), runtime.precision))
        return 1.0

    monkeypatch.setattr(budget, "train_step", step)
    runtime = hardware.detect_runtime("cpu", "fp32")
    llama = Recipe(arch="llama", qk_norm=True, optimizer="muon", learning_rate=2e-3)
    planner = Planner(runtime, model_overrides={"context": 64}, recipe=llama)
    plan = planner.budget_plan(0.01, 10_000, 320, TrainConfig(optimizer="muon", batch_size=2))
    assert len(timed) >= 4 and all(t == timed[0] for t in timed)  # a warm-up step and at least three timed
    config, optimizer, shape, precision = timed[0]
    assert (config.arch, config.qk_norm, config.context, config.vocab_size) == ("llama", True, 64, 320)
    assert (config.d_model, config.n_layer, config.n_head) == budget.PROBE_SHAPE
    assert optimizer is MuonAdamW and shape == (2, 64) and precision == runtime.precision
    assert plan.shape.context == 64 and plan.learning_rate == budget.learning_rate_for(plan.shape.d_model, 2e-3)

    timed.clear()
    Planner(runtime, model_overrides={"arch": "gpt2"}, recipe=llama).budget_plan(0.01, 10_000, 320, TrainConfig())
    config, optimizer, shape, _ = timed[0]  # the user's flags win over the recipe
    assert (config.arch, config.qk_norm, config.context) == ("gpt2", False, 256)
    assert optimizer is torch.optim.AdamW

