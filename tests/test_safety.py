"""Guarantees for a user's model folder: crash safety, exact resume after SIGKILL,
one writer at a time, safe loading of untrusted folders, clear errors for damage."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data import tokenizer as tokenizer_module
from engine.data.sources import source_from_text
from engine.data.tokenizer import train_tokenizer
from engine.folder.model_folder import ModelFolder, tokenizer_files
from engine.runtime import storage
from response_generator import sample_next_token
from trainer import Trainer

from conftest import ROOT, SAMPLE_TEXT, TINY_MODEL, TINY_TRAIN

WORKER = ROOT / "tests" / "train_worker.py"
EPOCHS = 3


def run_worker(model_dir, data_file, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != storage.KILL_ENV}
    if kill_at:
        env[storage.KILL_ENV] = kill_at
    proc = subprocess.run([sys.executable, str(WORKER), str(model_dir), str(data_file), str(EPOCHS)],
                          capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    return proc.returncode, parse_steps(proc.stdout), proc


def parse_steps(stdout):
    steps = {}
    for line in stdout.splitlines():
        if line.startswith("step "):
            _, n, loss = line.split()
            steps[int(n)] = float(loss)
    return steps


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file):
    code, steps, proc = run_worker(tmp_path_factory.mktemp("ref") / "model", data_file)
    assert code == 0, proc.stderr[-2000:]
    return steps


def assert_exact_resume(model_dir, data_file, reference, killed_steps):
    code, resumed, proc = run_worker(model_dir, data_file)
    assert code == 0, proc.stderr[-2000:]
    first = min(resumed)
    assert max(resumed) == max(reference)
    assert first - 1 >= max(killed_steps, default=0) - 5  # lost at most one checkpoint interval
    assert {s: resumed[s] for s in resumed} == {s: reference[s] for s in resumed}  # bit-exact losses


@pytest.mark.slow
@pytest.mark.parametrize("point", ["staged:checkpoint.pth#3", "before-journal#3", "after-journal#3"])
def test_sigkill_during_a_save_then_exact_resume(tmp_path, data_file, reference, point):
    code, killed, _ = run_worker(tmp_path / "model", data_file, kill_at=point)
    assert code == -signal.SIGKILL
    ModelFolder(tmp_path / "model").load_model()  # whatever survived is a consistent model
    assert_exact_resume(tmp_path / "model", data_file, reference, killed)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_exact_resume(tmp_path, data_file, reference):
    model_dir = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(data_file), str(EPOCHS)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    killed = {}
    for line in proc.stdout:
        if line.startswith("step "):
            _, n, loss = line.split()
            killed[int(n)] = float(loss)
            if int(n) == 13:
                proc.kill()
                break
    proc.wait(30)
    assert_exact_resume(model_dir, data_file, reference, killed)


@pytest.fixture
def trained(trained_copy):
    return trained_copy("bpe", 1)


class Malicious:
    """Unpickling this would create a file: the loader must never let it run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_crafted_pickle_is_refused_and_never_runs(trained, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"wte.weight": Malicious(str(marker))}, trained / "model.pth")
    (trained / "manifest.json").unlink()  # so the pickle reaches the loader itself
    with pytest.raises(ValueError) as refused:
        ModelFolder(trained).load_model()
    assert not marker.exists()
    message = str(refused.value)
    assert "model.pth holds something other than tensors" in message and "may be malicious" in message
    assert "not loaded" in message and "\n" not in message
    assert "weights_only" not in message and "trust the source" not in message  # no unsafe advice


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_damaged_weight_file_without_manifest_gets_one_line_without_torch_advice(tmp_path, damage):
    path = tmp_path / "model.pth"
    storage.write_bytes(path, storage.torch_bytes({"w": torch.ones(64)}))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if damage == "truncate" else b"")
    with pytest.raises(ValueError, match="cannot load .*damaged or not a weight file.*restore it") as failed:
        storage.load_torch(path)
    message = str(failed.value)
    assert "\n" not in message and "weights_only" not in message and "miniz" not in message


@pytest.mark.parametrize("damage", ["truncate", "empty", "bitflip"])
def test_damaged_weights_are_detected(trained, damage):
    path = trained / "model.pth"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        ModelFolder(trained).load_model()


def test_damaged_checkpoint_falls_back_to_the_weights(trained):
    path = trained / "checkpoint.pth"
    path.write_bytes(path.read_bytes()[:100])
    trainer = Trainer(str(trained))
    trainer.load()
    assert any("damaged" in n and "fresh optimizer" in n for n in trainer.notes)
    trainer.train(source_from_text(SAMPLE_TEXT + " more"), 1)  # and training carries on


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[:-20], "not valid JSON"),
    (lambda text: text.replace('"format_version": 2', '"format_version": 99'), "newer version"),
    (lambda text: text.replace('"n_layer": 1', '"n_layer": 100000'), "n_layer 100000 exceeds"),
    (lambda text: text.replace('"n_layer": 1', '"n_layer": 900'), "describes ~.* MiB of weights"),
    (lambda text: text.replace('"dropout"', '"__import__": "os", "dropout"'), "unknown model config keys"),
    (lambda text: text.replace('"tokenizer": "bpe"', '"tokenizer": "pickle"'), "unknown tokenizer"),
])
def test_bad_config_is_refused_before_allocating(trained, edit, message):
    path = trained / "config.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=message):
        ModelFolder(trained).load_model()


def test_tokenizer_that_disagrees_with_the_embedding_is_refused(trained):
    other = train_tokenizer("bpe", [SAMPLE_TEXT * 3], 360)
    storage.commit_files(trained, tokenizer_files(other))
    with pytest.raises(ValueError, match="tokens but the model expects"):
        ModelFolder(trained).load_model()


def test_panics_from_tokenizer_libraries_are_reported(monkeypatch):
    class PanicException(BaseException):  # what a Rust panic looks like from Python
        pass

    def panic(*args, **kwargs):
        raise PanicException("index out of bounds")

    monkeypatch.setattr(tokenizer_module.BPETokenizer, "train", panic)
    with pytest.raises(ValueError, match="training the bpe tokenizer failed: index out of bounds"):
        train_tokenizer("bpe", ["text"], 400)


def test_second_writer_is_refused(trained):
    holder = ModelFolder(trained)
    with holder.writer_lock():
        with pytest.raises(ValueError, match=f"being trained by process {os.getpid()}"):
            Trainer(str(trained)).train(source_from_text(SAMPLE_TEXT), 1)
    Trainer(str(trained)).train(source_from_text(SAMPLE_TEXT), 1)  # free again afterwards


def test_lock_of_a_killed_process_does_not_stick(trained):
    code = ("import sys, os, signal; sys.path.insert(0, %r); from engine.folder.model_folder import ModelFolder\n"
            "with ModelFolder(%r).writer_lock(): os.kill(os.getpid(), signal.SIGKILL)") % (str(ROOT), str(trained))
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with ModelFolder(trained).writer_lock():
        pass


def test_disk_full_during_a_save_keeps_the_previous_state(trained, monkeypatch):
    before = (trained / "model.pth").read_bytes()

    def full(name):
        if name == "staged:checkpoint.pth":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "_crash_point", full)
    with pytest.raises(OSError, match="No space left on device; the previous save is intact"):
        Trainer(str(trained)).train(source_from_text(SAMPLE_TEXT + " again"), 1)
    monkeypatch.undo()
    assert (trained / "model.pth").read_bytes() == before
    ModelFolder(trained).load_model()


def test_unwritable_model_folder_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    trainer = Trainer(str(blocker / "model"), "bpe", model_overrides=TINY_MODEL, train_overrides=TINY_TRAIN)
    with pytest.raises(ValueError, match="cannot write to the model folder"):
        trainer.train(source_from_text(SAMPLE_TEXT), 1)


def test_stray_temp_files_are_cleaned(trained):
    (trained / ".tmp-model.pth.abc").write_bytes(b"half a file")
    (trained / ".staging").mkdir()
    (trained / ".staging" / "model.pth").write_bytes(b"uncommitted")
    ModelFolder(trained).load_model()
    assert not (trained / ".tmp-model.pth.abc").exists() and not (trained / ".staging").exists()


def test_history_and_manifest_describe_the_same_save(trained):
    manifest = json.loads((trained / "manifest.json").read_text())
    config = json.loads((trained / "config.json").read_text())
    assert manifest["step"] == config["progress"]["step"]
    assert set(manifest["files"]) == {"model.pth", "checkpoint.pth"}


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def any_tokenizer(request):
    return train_tokenizer(request.param, [SAMPLE_TEXT], 400)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_on_arbitrary_unicode(any_tokenizer, text):
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-50, 50), min_size=1, max_size=64), temperature=st.floats(0, 3),
       top_k=st.integers(0, 80), top_p=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_sampling_never_leaves_the_vocabulary(logits, temperature, top_k, top_p, seed):
    g = random.Random(seed)
    token = sample_next_token(torch.tensor(logits), g, temperature, top_k, top_p)
    assert 0 <= token < len(logits)


def test_a_version_1_folder_is_read_and_upgraded_at_its_next_save(trained):
    """Folders written before format 2 named the context max_seq_len and the target vocab_size."""
    import json

    path = trained / "config.json"
    meta = json.loads(path.read_text())
    meta["format_version"] = 1
    meta["model"]["max_seq_len"] = meta["model"].pop("context")
    meta["training"]["vocab_size"] = meta["training"].pop("target_vocab_size")
    path.write_text(json.dumps(meta))
    model, _, _ = ModelFolder(trained).load_model()
    assert model.config.context == TINY_MODEL["context"]
    trainer = Trainer(str(trained))
    assert trainer.config.target_vocab_size == TINY_TRAIN["target_vocab_size"]
    trainer.train(source_from_text(SAMPLE_TEXT), 1)
    saved = json.loads(path.read_text())
    assert saved["format_version"] == 2 and saved["model"]["context"] == TINY_MODEL["context"]
    assert "max_seq_len" not in saved["model"] and "vocab_size" not in saved["training"]


# config.json and history.json as this program writes them today (a text run, a budget
# run, a chat fine-tune after the chat tokens were added), and as folders from before the
# typed records hold them: runs without "kind"/"minutes", evaluations without the newer
# fields, no "created", format 1's key names.
TODAY_META = {
    "tokenizer": "bpe",
    "model": {"vocab_size": 324, "context": 32, "d_model": 32, "n_layer": 1, "n_head": 2, "d_ff": 128,
              "dropout": 0.1, "arch": "gpt2", "qk_norm": False, "rope_theta": 10000.0},
    "training": {"learning_rate": 0.001, "min_lr_ratio": 0.1, "warmup_steps": 100, "weight_decay": 0.01,
                 "grad_clip": 1.0, "batch_size": 4, "val_fraction": 0.05, "checkpoint_every": 10,
                 "eval_batches": 4, "target_vocab_size": 320, "rehearsal": 0.2, "seed": 1337, "max_minutes": 0.0,
                 "compile": False, "optimizer": "adamw"},
    "created": "2024-05-01 10:00:00",
    "progress": {"step": 42, "tokens_seen": 5376, "epochs_done": 3},
    "chat_tuned": True,
    "format_version": 2,
}
TODAY_HISTORY = {
    "steps": [[1, 5.81234, 0.0005], [2, 5.7, 0.001], [41, 3.25, 0.0001], [42, 3.2, 0.0001]],
    "evals": [{"val_loss": 4.1, "perplexity": 60.34, "bpb": 2.5, "val_tokens": 120, "step": 20, "epoch": 1,
               "dataset": "sample.txt", "partial_epoch": False},
              {"val_loss": 3.9, "perplexity": 49.4, "bpb": 2.4, "val_tokens": 40, "step": 42, "epoch": 2,
               "dataset": "chats.jsonl", "partial_epoch": True}],
    "runs": [{"name": "sample.txt", "start_step": 0, "epochs": 1, "tokens": 2000, "kind": "text", "minutes": 0.0},
             {"name": "more.txt", "start_step": 20, "epochs": 12, "tokens": 900, "kind": "text", "minutes": 0.5},
             {"name": "chats.jsonl", "start_step": 30, "epochs": 2, "tokens": 300, "kind": "chat", "minutes": 0.0}],
    "expansions": [{"step": 30, "added": 4, "new_vocab": 324}],
}


def test_todays_json_is_read_into_records_and_written_back_unchanged():
    from engine.folder.records import FolderMeta, History, RunKind

    meta = FolderMeta.from_dict(json.loads(json.dumps(TODAY_META)))
    assert meta.model.context == 32 and meta.progress.step == 42 and meta.chat_tuned
    assert {**meta.to_dict(), "format_version": 2} == TODAY_META
    history = History.from_dict(json.loads(json.dumps(TODAY_HISTORY)))
    assert history.steps[0].loss == 5.81234 and history.steps[-1].lr == 0.0001
    assert [r.kind for r in history.runs] == [RunKind.TEXT, RunKind.TEXT, RunKind.CHAT] and history.runs[1].minutes
    assert history.evals[1].partial_epoch and history.expansions[0].new_vocab == 324
    assert json.loads(json.dumps(history.to_dict())) == TODAY_HISTORY
    bare = {**TODAY_HISTORY, "expansions": []}
    assert "expansions" not in History.from_dict(bare).to_dict()  # the key comes with the first growth


def test_older_json_shapes_still_load():
    from engine.folder.records import FolderMeta, History, RunKind
    from engine.training.runs import Progress

    old_meta = {k: v for k, v in TODAY_META.items() if k not in ("created", "chat_tuned")}
    old_meta["format_version"] = 1
    old_meta["model"] = {("max_seq_len" if k == "context" else k): v for k, v in TODAY_META["model"].items()}
    old_meta["training"] = {("vocab_size" if k == "target_vocab_size" else k): v
                            for k, v in TODAY_META["training"].items()}
    meta = FolderMeta.from_dict(old_meta)
    assert meta.model.context == 32 and meta.training["target_vocab_size"] == 320 and not meta.chat_tuned
    assert "max_seq_len" not in meta.to_dict()["model"] and "vocab_size" not in meta.to_dict()["training"]
    old_history = {"steps": [[1, 5.8, 0.0005]], "runs": [{"name": "a.txt", "start_step": 0, "epochs": 2,
                                                         "tokens": 100}],
                   "evals": [{"val_loss": 4.1, "perplexity": 60.3, "bpb": 2.5, "val_tokens": 12, "step": 1}]}
    history = History.from_dict(old_history)
    assert history.runs[0].kind is RunKind.TEXT and history.runs[0].minutes == 0.0
    assert history.evals[0].dataset == "" and not history.evals[0].partial_epoch
    # A checkpoint's run from before format 2 named the window "seq_len".
    saved = {"step": 7, "tokens_seen": 896, "epochs_done": 0,
             "run": {"cache_file": "c.bin", "name": "a.txt", "epochs": 2, "total_steps": 20, "batch_size": 4,
                     "seq_len": 32, "start_step": 0, "epoch": 0, "batch": 7, "run_step": 7}}
    progress = Progress.from_dict(saved)
    assert progress.run.window == 32 and progress.run.kind is RunKind.TEXT
    again = progress.to_dict()
    assert again["run"]["kind"] == "text" and type(again["run"]["kind"]) is str  # weights_only loads it back


def test_a_folder_with_todays_and_older_json_loads_and_trains_on(trained):
    """The JSON files of a real folder replaced by the shapes above: it loads, shows its status, trains on."""
    meta = json.loads((trained / "config.json").read_text())
    meta.pop("created")
    (trained / "config.json").write_text(json.dumps(meta))
    history = json.loads((trained / "history.json").read_text())
    for run in history["runs"]:
        del run["kind"], run["minutes"]
    (trained / "history.json").write_text(json.dumps(history))
    status = ModelFolder(trained).status()
    assert status.runs[0].kind == "text" and status.steps == meta["progress"]["step"]
    trainer = Trainer(str(trained))
    result = trainer.train(source_from_text(SAMPLE_TEXT + " more"), 1)
    saved = json.loads((trained / "history.json").read_text())
    assert [r["kind"] for r in saved["runs"]] == ["text", "text"] and saved["steps"][-1][0] == result.global_step
    assert json.loads((trained / "config.json").read_text())["progress"]["step"] == result.global_step
