"""The real program, driven through its standard input, plus the menu's input rules."""
import io
import subprocess
import sys
from pathlib import Path

import pytest

from engine.app.console import BUILTIN_TEXT_LENGTH, Console, parse_whole_number
from engine.app.display import ConsoleOutput
from engine.folder.model_folder import ModelFolder
from interface import main

from conftest import ROOT, SAMPLE_TEXT, TINY_CLI

MENU_TRAIN_STATUS_QA_CHAT_INFO = [
    "1",  # Main: Training
    "1",  # Training: Train from File
    "{file}",
    "2",  # epochs
    "4",  # Training Status
    "6",  # Back
    "2",  # Main: Response
    "1",  # Q&A
    "Where did the river run?",
    "",  # back to the Response Menu
    "2",  # Chat
    "Hello there",
    "What about the orchard?",
    "/exit",
    "6",  # Back
    "3",  # System Information
    "5",  # Exit
]


def run_program(model_dir: Path, lines: list[str], *extra: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "interface.py"), "--model-dir", str(model_dir), *TINY_CLI, *extra],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_whole_workflow_through_stdin(tmp_path, sample_file, kind):
    model_dir = tmp_path / "model"
    lines = [kind] + [line.format(file=sample_file) for line in MENU_TRAIN_STATUS_QA_CHAT_INFO]
    proc = run_program(model_dir, lines)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in out + proc.stderr
    assert "Training complete" in out
    assert "Validation after epoch 2" in out and "bits/byte" in out
    assert "=== Training Status ===" in out and "Training loss by step" in out
    assert out.count("Answer: ") == 1
    assert out.count("AI: ") == 2
    assert "=== System Information ===" in out and "PyTorch" in out
    assert "Goodbye." in out
    expected = {"config.json", "model.pth", "checkpoint.pth", "tokenizer_type.txt", "history.json",
                "tokenizer.json" if kind == "bpe" else "tokenizer.model"}
    assert expected <= {p.name for p in model_dir.iterdir()}
    assert (model_dir / "tokenizer_type.txt").read_text().strip() == kind


def test_bad_input_is_answered_and_the_program_carries_on(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    lines = [
        "wordpiece", "",  # unknown tokenizer, then the default
        "abc", "", "99", "-1", "١", "1",  # invalid main-menu entries, then Training
        "1", str(tmp_path / "missing.txt"),  # a path that does not exist
        "1", str(empty),  # an empty file
        "3",  # Continue Training before any model exists
        "4",  # Training Status before any model exists
        "5",  # Train on Conversations before any model exists
        "6", "2",  # Response Mode before any model exists
        "3",  # System Information
        "4",  # Export before any model exists
    ]  # then end of input (Ctrl+D) at the main menu
    proc = run_program(tmp_path / "model", lines)
    out = proc.stdout
    assert proc.returncode == 0 and "Traceback" not in out + proc.stderr
    assert "unknown tokenizer 'wordpiece'" in out
    assert out.count("Invalid choice") == 5
    assert "no such file or folder" in out
    assert "is empty" in out or "holds no text" in out
    assert "no model to continue" in out
    assert "No model yet" in out
    assert "No trained model" in out and "Train one first" in out
    assert "No trained model to export yet" in out
    assert out.rstrip().endswith("Goodbye.")


class Script:
    """Feeds answers to App like a user would; raises EOFError when out of answers."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.prompts = []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.answers:
            raise EOFError
        answer = self.answers.pop(0)
        if answer is KeyboardInterrupt:
            raise KeyboardInterrupt
        return answer


def run_app(tmp_path, answers, *extra):
    out = []
    code = main(["--model-dir", str(tmp_path / "model"), *TINY_CLI, *extra], Script(answers), out.append)
    return code, "\n".join(out)


def test_letters_where_epochs_are_asked_then_typed_text(tmp_path):
    answers = ["bpe", "1", "2", *SAMPLE_TEXT.splitlines(), "END", "abc", "0", "1e9", "1", "4"]
    code, out = run_app(tmp_path, answers)
    assert code == 0
    assert out.count("Invalid length") == 3
    assert "Training complete" in out and "Training loss by step" in out


def test_ctrl_c_at_a_prompt_cancels_without_traceback(tmp_path):
    code, out = run_app(tmp_path, ["", "1", KeyboardInterrupt, "6", "5"])
    assert code == 0 and "(cancelled)" in out and "Goodbye." in out


def test_eof_in_the_middle_of_a_dialog_exits_cleanly(tmp_path, sample_file):
    code, out = run_app(tmp_path, ["bpe", "1", "1", str(sample_file)])
    assert code == 0 and out.rstrip().endswith("Goodbye.")


def test_chat_commands(tmp_path, sample_file):
    answers = ["bpe", "1", "1", str(sample_file), "1", "6", "2", "2",
               "/help", "/temp 0", "/len 5", "/topk 3", "/seed 4", "/set top_p 0.5", "/set repeat_penalty 1.2",
               "/temp hot", "/set warmth 3", "/bogus", "", "hi", '"""two', "lines", 'here"""', "/show", "/reset",
               "/exit", "3", "The river", "", "4", "6", "5"]
    code, out = run_app(tmp_path, answers)
    assert code == 0
    assert "Chat commands:" in out and "/system TEXT" in out
    assert ("(temperature 0.0, top_k 3, top_p 0.5, repetition_penalty 1.2, max_new_tokens 5, seed 4)" in out)
    assert "temperature needs a number" in out and "unknown setting 'warmth'" in out
    assert "Unknown command /bogus" in out
    assert sum(line.startswith("AI: ") for line in out.splitlines()) == 2  # "hi" and the three-line message
    assert "Turns so far: 2" in out or "Turns so far: 1" in out  # an empty reply is not a turn
    assert "(conversation cleared; the system message stays)" in out
    assert "=== Model Information ===" in out and "Parameters" in out


def test_parse_whole_number_accepts_only_ascii_digits():
    assert parse_whole_number(" 7 ", 1, 9, "x") == 7
    for bad in ("١", "7.0", "1e3", "", "seven", "10", " 0 ", "-1"):
        with pytest.raises(ValueError) as info:
            parse_whole_number(bad, 1, 9, "x")
        assert str(info.value) == f"x must be a whole number from 1 to 9 (got {bad.strip()!r})"


def test_existing_model_tokenizer_wins(tmp_path, sample_file):
    run_app(tmp_path, ["sentencepiece", "1", "1", str(sample_file), "1", "6", "5"])
    code, out = run_app(tmp_path, ["5"], "--tokenizer", "bpe")
    assert "already holds a sentencepiece model" in out
    assert ModelFolder(tmp_path / "model").has_model()


def test_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and "--model-dir" in proc.stdout


def test_stdout_is_flushed_for_streaming(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    ConsoleOutput.write_partial("abc")
    assert buf.getvalue() == "abc"


def start_long_training(model_dir, sample_file, later_lines):
    """Start the real program on a long run; return it once epoch 3 is under way."""
    import threading

    lines = ["bpe", "1", "1", str(sample_file), "8", *later_lines]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "interface.py"), "--model-dir", str(model_dir), *TINY_CLI,
         "--checkpoint-every", "1000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stderr_chunks = []
    epoch_3 = threading.Event()

    def pump():
        try:
            while chunk := proc.stderr.read(64):
                proc.stderr_chunks.append(chunk)
                if "Epoch 3/" in "".join(proc.stderr_chunks[-40:]):
                    epoch_3.set()
        except (ValueError, OSError):
            # communicate() closes the pipe once the program ends; a read racing that
            # raised in this thread (pytest's intermittent unhandled-thread warning).
            pass

    threading.Thread(target=pump, daemon=True).start()
    proc.stdin.write("\n".join(lines) + "\n")
    proc.stdin.flush()
    assert epoch_3.wait(120), "training never reached epoch 3"
    return proc


@pytest.mark.slow
def test_ctrl_c_during_training_saves_and_continue_resumes(tmp_path, sample_file):
    """A real SIGINT in the middle of training: checkpoint, back to the menu, resume later."""
    import signal

    proc = start_long_training(tmp_path / "model", sample_file, ["3", "y", "6", "5"])
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    err = "".join(proc.stderr_chunks)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err
    assert "Training stopped (interrupted)" in out
    assert "Resuming the interrupted run" in out
    assert "Training complete" in out


@pytest.mark.slow
def test_sigterm_during_training_saves_and_exits(tmp_path, sample_file):
    import json
    import signal

    import torch

    proc = start_long_training(tmp_path / "model", sample_file, ["5"])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in out + "".join(proc.stderr_chunks)
    assert "Terminated at step" in out and out.rstrip().endswith("Goodbye.")
    step = int(out.split("Terminated at step ")[1].split(";")[0])
    ckpt = torch.load(tmp_path / "model" / "checkpoint.pth", weights_only=True)
    assert ckpt["state"]["step"] == step and not ckpt["state"]["run"]["finished"]
    assert json.loads((tmp_path / "model" / "manifest.json").read_text())["step"] == step


@pytest.mark.slow
def test_enter_at_the_file_prompt_trains_on_the_builtin_corpus(tmp_path):
    # A time limit keeps this short; the corpus itself is ~10 MB of conversations. Its length
    # question offers the first session's minutes, a file's offers epochs.
    answers = Script(["", "1", "1", "", "1", "6", "2", "3", "The with statement", "", "6", "5"])
    out = []
    code = main(["--model-dir", str(tmp_path / "model"), *TINY_CLI, "--max-minutes", "0.05"], answers, out.append)
    out = "\n".join(out)
    assert code == 0
    assert "built-in corpus (everyday conversations as plain text)" in out
    assert f"[default: {BUILTIN_TEXT_LENGTH.describe()}]" in answers.prompts[4] and "minutes" in answers.prompts[4]
    assert "Training stopped (time limit reached)" in out
    assert "Validation at step" in out and "bits/byte" in out
    assert "Error" not in out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_continue_training_with_vocabulary_growth_through_stdin(tmp_path, sample_file, kind):
    new_file = tmp_path / "biology.txt"
    new_file.write_text(("Photosynthesis in chloroplasts turns sunlight into sugar; "
                         "mitochondria burn it for energy.\n") * 40, encoding="utf-8")
    lines = [kind, "1", "1", str(sample_file), "1",  # first model
             "3", str(new_file), "y", "40", "1",  # Continue Training: expand, up to 40 tokens, 1 epoch
             "4", "6", "5"]
    proc = run_program(tmp_path / "model", lines)
    out = proc.stdout
    assert proc.returncode == 0 and "Traceback" not in out + proc.stderr, proc.stderr[-2000:]
    assert "Vocabulary: " in out and "added, e.g." in out
    assert "Tokens per byte of the new data" in out
    assert "Held-out results per dataset:" in out
    table = out.split("Held-out results per dataset:")[1]
    assert str(sample_file) in table and str(new_file) in table and "(new) ->" in table
    status = out.split("=== Training Status ===")[1]
    assert status.count("bits/byte") >= 3  # last validation + one line per dataset


def test_ctrl_c_during_an_answer_stops_only_that_answer():
    out = []
    console = Console(Script([]), out.append)

    def pieces():
        yield "Hello"
        yield " wor"
        raise KeyboardInterrupt

    console.show_stream("AI: ", pieces())
    console.notes(["a notice"])
    assert out == ["AI: Hello wor [stopped]", "Note: a notice"]


def test_serve_from_the_response_menu_reports_a_taken_port_and_carries_on(trained_copy, tmp_path):
    import shutil
    import socket

    shutil.copytree(trained_copy("bpe", 1), tmp_path / "model")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = run_app(tmp_path, ["2", "5", str(port), "4", "6", "5"])
    assert code == 0 and "Serving on 127.0.0.1 only" in out
    assert "The server did not start" in out and str(port) in out
    assert "=== Model Information ===" in out and out.rstrip().endswith("Goodbye.")
