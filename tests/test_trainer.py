"""Training: it learns, it checkpoints safely, and it resumes exactly."""
import json
import math

import pytest
import torch

from engine.data.sources import source_from_text
from engine.folder.model_folder import ModelFolder
from engine.runtime import hardware
from engine.training.events import (
    CompileChecked,
    CompileFailed,
    MemoryBackoff,
    Notice,
    RunStarted,
    StepDone,
    TokenizerTraining,
)
from engine.training.runs import StopFlag
from model import GPT
from trainer import TrainConfig, Trainer, lr_at

from conftest import SAMPLE_TEXT, TINY_MODEL, TINY_TRAIN

FP32 = hardware.detect_runtime("cpu", "fp32")


def make_trainer(folder, kind="bpe", **train):
    return Trainer(str(folder), kind, model_overrides=TINY_MODEL, train_overrides={**TINY_TRAIN, **train})


def record(losses, stop_at=None, flag=None, crash_at=None):
    def on_event(event):
        if not isinstance(event, StepDone):
            return
        losses[event.step] = event.loss
        if stop_at is not None and event.step == stop_at:
            flag.set("interrupted")
        if crash_at is not None and event.step == crash_at:
            raise RuntimeError("simulated crash")
    return on_event


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_overfits_a_short_text(tmp_path, optimizer):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    trainer = Trainer(str(tmp_path / "m"), "bpe", model_overrides={**TINY_MODEL, "dropout": 0.0},
                      train_overrides={**TINY_TRAIN, "learning_rate": 3e-3, "warmup_steps": 5, "optimizer": optimizer})
    losses = {}
    trainer.train(source_from_text(text), epochs=40, on_event=record(losses))
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.3 * first, (first, last)


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 200, cfg) for s in range(200)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    short = [lr_at(s, 20, cfg) for s in range(20)]  # warm-up capped at a tenth of the run
    assert short[1] == pytest.approx(1e-3)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_stopped_run_resumes_with_identical_losses(tmp_path, kind):
    src = source_from_text(SAMPLE_TEXT)
    straight = {}
    make_trainer(tmp_path / "a", kind).train(src, 2, record(straight))

    first = {}
    flag = StopFlag()
    result = make_trainer(tmp_path / "b", kind).train(src, 2, record(first, stop_at=7, flag=flag), flag)
    assert result.stopped_early == "interrupted" and result.global_step == 7

    resumed = {}
    again = make_trainer(tmp_path / "b", kind)  # a fresh process would build a new Trainer
    assert again.interrupted_run().run_step == 7
    result = again.train(src, 2, record(resumed))
    assert result.resumed and not result.stopped_early
    assert min(resumed) == 8
    assert {**first, **resumed} == straight  # exactly equal floats, step for step


def test_crash_loses_only_steps_since_last_checkpoint(tmp_path):
    src = source_from_text(SAMPLE_TEXT)
    straight = {}
    make_trainer(tmp_path / "a").train(src, 2, record(straight))
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "b").train(src, 2, record({}, crash_at=13))
    resumed = {}
    make_trainer(tmp_path / "b").resume(record(resumed))
    assert min(resumed) == 11  # the checkpoint at step 10 survived
    assert all(resumed[s] == straight[s] for s in resumed)


def test_model_folder_is_complete_and_loads_weights_only(tmp_path):
    folder = tmp_path / "m"
    make_trainer(folder).train(source_from_text(SAMPLE_TEXT), 1)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.pth", "checkpoint.pth", "tokenizer.json", "tokenizer_type.txt",
            "history.json", "cache"} <= names
    assert not [n for n in names if n.startswith(".tmp-")]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format_version"] == 2 and meta["tokenizer"] == "bpe"
    assert meta["model"]["d_model"] == 32 and meta["training"]["target_vocab_size"] == 320
    state = torch.load(folder / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "state", "rng"} <= set(state)
    assert state["state"]["run"]["finished"] is True


def test_continue_on_new_data_keeps_step_count_and_optimizer(tmp_path):
    folder = tmp_path / "m"
    first = make_trainer(folder).train(source_from_text(SAMPLE_TEXT), 1)
    trainer = make_trainer(folder)
    trainer.load()
    moments = trainer.optimizer.state_dict()["state"]
    assert len(moments) == len(list(trainer.model.parameters()))  # every weight has its state
    adam = [s for s in moments.values() if "step" in s]  # Muon's matrices keep a momentum buffer, no count
    assert adam and all(float(s["step"]) == first.global_step for s in adam)
    more = trainer.train(source_from_text("Completely new material about ships and harbours. " * 30), 1)
    assert not more.resumed
    assert more.global_step == first.global_step + more.steps
    status = ModelFolder(folder).status()
    assert status.steps == more.global_step and len(status.runs) == 2
    assert math.isfinite(status.last_eval.bpb)


def test_existing_model_keeps_its_tokenizer_and_size(tmp_path):
    folder = tmp_path / "m"
    make_trainer(folder, "sentencepiece").train(source_from_text(SAMPLE_TEXT), 1)
    again = Trainer(str(folder), "bpe", model_overrides={"d_model": 64})
    assert again.tokenizer_kind == "sentencepiece"
    assert any("sentencepiece" in n for n in again.notes)
    assert any("size settings are kept" in n for n in again.notes)


@pytest.mark.parametrize("epochs", [0, -1, "3", 10**9, True])
def test_bad_epochs_are_refused(tmp_path, epochs):
    with pytest.raises(ValueError, match="epochs"):
        make_trainer(tmp_path / "m").train(source_from_text(SAMPLE_TEXT), epochs)


def test_text_shorter_than_the_context_trains_on_shorter_windows(tmp_path):
    trainer = make_trainer(tmp_path / "m")
    events = []
    result = trainer.train(source_from_text("A short note about the mill and the river, nothing more."), 2,
                           events.append)
    assert result.global_step > 0
    notes = [e.text for e in events if isinstance(e, Notice)]
    assert any("the text is short" in n and "instead of 32" in n for n in notes)


def test_a_lowered_vocabulary_is_told_before_training_starts(tmp_path):
    events = []
    make_trainer(tmp_path / "m", target_vocab_size=5000).train(source_from_text(SAMPLE_TEXT), 1, events.append)
    kinds = [type(e) for e in events]
    lowered = next(i for i, e in enumerate(events) if isinstance(e, Notice) and "lowered from 5000" in e.text)
    assert kinds.index(TokenizerTraining) < lowered < kinds.index(RunStarted) < kinds.index(StepDone)


def test_text_too_short_to_learn_from_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="the text is too short"):
        make_trainer(tmp_path / "m").train(source_from_text("hi"), 1)
    assert not (tmp_path / "m" / "config.json").exists()  # no half-made model is left behind


def simulate_gpu_memory(monkeypatch, max_rows):
    """Make every training forward pass with more than ``max_rows`` sequences fail the
    way a full GPU does, so the back-off can be tested on the CPU."""
    real_forward = GPT.forward

    def forward(self, idx, *args, **kwargs):
        if torch.is_grad_enabled() and idx.shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {idx.shape[0]} rows > {max_rows})")
        return real_forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)


def test_out_of_memory_halves_the_micro_batch_and_learns_the_same(tmp_path, monkeypatch):
    src = source_from_text(SAMPLE_TEXT)
    no_dropout = {**TINY_MODEL, "dropout": 0.0}  # dropout masks would differ per slice

    def trainer(name):  # fp32: the tolerance below is for fp32 sums, whatever this CPU's default
        return Trainer(str(tmp_path / name), "bpe", model_overrides=no_dropout, train_overrides=TINY_TRAIN,
                       runtime=FP32)

    straight = {}
    trainer("a").train(src, 2, record(straight))

    simulate_gpu_memory(monkeypatch, max_rows=1)  # batch 4 fits only one sequence at a time
    backoffs, losses = [], {}
    step_losses = record(losses, stop_at=6, flag=(flag := StopFlag()))

    def on_event(event):
        if isinstance(event, MemoryBackoff):
            backoffs.append(event)
        step_losses(event)

    result = trainer("b").train(src, 2, on_event, flag)
    assert result.stopped_early == "interrupted"
    # Halved twice on the first step (4 -> 2 -> 1 rows), then never again.
    assert [(b.micro_batches, b.micro_batch_size) for b in backoffs] == [(2, 2), (4, 1)]
    again = trainer("b")
    assert again.interrupted_run().micro_batches == 4  # the setting is saved with the run
    backoffs.clear()
    again.train(src, 2, on_event)
    assert backoffs == []
    # Same batches, same schedule, same step count: only the rounding of the sums differs.
    assert losses.keys() == straight.keys()
    for step, loss in straight.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step


def test_out_of_memory_at_one_sequence_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    src = source_from_text(SAMPLE_TEXT)
    make_trainer(folder).train(src, 1, record({}))
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix == ".pth"}
    simulate_gpu_memory(monkeypatch, max_rows=0)
    with pytest.raises(MemoryError, match="even with one sequence per micro-batch"):
        make_trainer(folder).train(src, 1, record({}))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pth"} == saved


def test_micro_batches_give_the_gradients_of_the_whole_batch(tiny_model, tiny_config):
    from trainer import accumulate_gradients

    tiny_model.eval()  # no dropout: the two ways must agree
    runtime = hardware.detect_runtime("cpu", "fp32")
    x = torch.randint(0, tiny_config.vocab_size, (5, 16))
    y = torch.randint(0, tiny_config.vocab_size, (5, 16))
    whole = accumulate_gradients(tiny_model, x, y, runtime, 1)
    expected = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad(set_to_none=True)
    sliced = accumulate_gradients(tiny_model, x, y, runtime, 3)  # uneven slices: 2, 2, 1 rows
    torch.testing.assert_close(sliced, whole)
    for p, g in zip(tiny_model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def raising_compile(model, **kwargs):
    def compiled(*args, **kw):
        raise RuntimeError("simulated: the C++ compiler is missing")
    return compiled


def nan_compile(model, **kwargs):
    def compiled(*args, **kw):
        logits, loss = model(*args, **kw)
        return logits, loss * float("nan")
    return compiled


@pytest.mark.parametrize("compiler, says", [(raising_compile, "C++ compiler is missing"), (nan_compile, "not finite")])
def test_a_failing_torch_compile_falls_back_to_eager_without_losing_the_step(tmp_path, monkeypatch, compiler, says):
    """A compiled model that raises (no C++ compiler), or whose loss is NaN where the eager one's
    is not (inductor's was, reusing kernels its on-disk cache kept from a run under another
    ATEN_CPU_CAPABILITY): the step is retried eagerly and training goes on without compile,
    losing nothing. No dropout: a failed try that ran the model drew dropout masks."""
    src = source_from_text(SAMPLE_TEXT)

    def trainer(folder, **train):
        return Trainer(str(folder), "bpe", model_overrides={**TINY_MODEL, "dropout": 0.0},
                       train_overrides={**TINY_TRAIN, **train})

    eager = {}
    trainer(tmp_path / "a").train(src, 1, record(eager))
    monkeypatch.setattr(torch, "compile", compiler)
    events, losses = [], {}
    step_losses = record(losses)

    def on_event(event):
        events.append(event)
        step_losses(event)

    trainer(tmp_path / "b", compile=True).train(src, 1, on_event)
    kinds = [type(e) for e in events]
    assert kinds.count(CompileChecked) == 1 and kinds.count(CompileFailed) == 1
    assert kinds.index(CompileFailed) < kinds.index(StepDone)  # the first step was retried eagerly
    assert says in next(e for e in events if isinstance(e, CompileFailed)).reason
    assert losses == eager


def test_compile_is_refused_cleanly_where_torch_has_none(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    compiled, note = hardware.compile_model(torch.nn.Linear(2, 2))
    assert compiled is None and "without it" in note


@pytest.mark.slow
def test_torch_compile_really_trains_and_saves_plain_weights(tmp_path, monkeypatch):
    """The real compiler (about half a minute on two cores): same losses as eager, to rounding.

    Inductor gets a cache of its own: its shared one in /tmp keeps kernels across runs, and
    kernels built there under ATEN_CPU_CAPABILITY=avx2 and reused natively (or the reverse)
    gave NaN losses and an abort."""
    if not hasattr(torch, "compile"):
        pytest.skip("this PyTorch has no torch.compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    src = source_from_text(SAMPLE_TEXT)
    no_dropout = {**TINY_MODEL, "dropout": 0.0}
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        losses, events = {}, []
        step_losses = record(losses)

        def on_event(event, events=events, step_losses=step_losses):
            events.append(event)
            step_losses(event)

        Trainer(str(tmp_path / name), "bpe", model_overrides=no_dropout,
                train_overrides={**TINY_TRAIN, "compile": compiled}, runtime=FP32).train(src, 1, on_event)
        failed = [e.reason for e in events if isinstance(e, CompileFailed)]
        assert not failed, failed
        runs[name] = losses
    assert runs["compiled"].keys() == runs["eager"].keys()
    for step, loss in runs["eager"].items():
        assert runs["compiled"][step] == pytest.approx(loss, rel=1e-3), step
    weights = torch.load(tmp_path / "compiled" / "model.pth", weights_only=True)
    assert not any("_orig_mod" in key for key in weights)
