"""The command line: the real program for a whole run, its rules in-process, the plain progress
lines, the loss plot and the menu's Export entry."""
import io
import json
import os
import signal
import subprocess
import sys

import pytest

from engine.app import cli
from engine.app.display import TrainingProgress
from engine.app.loss_plot import loss_curves
from engine.folder.records import EvalResult, History
from engine.training.events import EpochStarted, Evaluated, StepDone
from interface import main
from response_generator import GenerationConfig, ResponseGenerator

from conftest import ROOT, SAMPLE_TEXT, TINY_CLI

TINY_TRAIN_CLI = TINY_CLI[:TINY_CLI.index("--seed")]  # --seed is a generation flag, which train does not take


def program(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "interface.py"), *args]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(program(*args), input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.slow
def test_train_ctrl_c_resume_status_generate_export(tmp_path, capsys):
    model_dir = str(tmp_path / "model")
    data = tmp_path / "short.txt"
    data.write_text(SAMPLE_TEXT[:2800], encoding="utf-8")  # about a dozen batches an epoch
    # Standard error is a pipe, not a terminal: progress comes as plain lines.
    proc = subprocess.Popen(program("train", str(data), "--model-dir", model_dir, *TINY_TRAIN_CLI, "--epochs", "2",
                                    "--checkpoint-every", "1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    progress = []
    for line in proc.stderr:
        progress.append(line)
        if line.startswith("Epoch 1/2: batch"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Training stopped (interrupted)" in out and "python interface.py continue --resume" in out
    assert "Traceback" not in out + err and "\r" not in "".join(progress) + err
    assert "| loss " in progress[-1]

    assert main(["continue", "--resume", "--model-dir", model_dir]) == 0
    assert "Resuming the interrupted run" in capsys.readouterr().out

    assert main(["--model-dir", model_dir, "status", "--json"]) == 0  # the flag before the subcommand, as in git
    report = json.loads(capsys.readouterr().out)
    assert report["epochs"] == 2 and report["last_eval"]["bpb"] > 0 and report["loss_plot"] is None

    settings = ["--temperature", "0", "--max-new-tokens", "12"]
    generated = run("generate", "--model-dir", model_dir, *settings, stdin="The river")
    expected = "".join(ResponseGenerator(model_dir).complete("The river", GenerationConfig(12, temperature=0.0)))
    assert generated.returncode == 0 and generated.stderr == ""
    assert generated.stdout == expected  # the text alone, not even a newline when piped

    exported = run("export", str(tmp_path / "model.gguf"), "--model-dir", model_dir)
    assert exported.returncode == 0 and "Exported to" in exported.stdout, exported.stderr
    from gguf import GGUFReader

    assert GGUFReader(str(tmp_path / "model.gguf")).fields["general.architecture"].contents() == "llama"  # the block a new model gets


def test_errors_are_one_line_with_the_exit_status(tmp_path, trained_once, capsys, monkeypatch):
    real = run("ask", "What?", "--model-dir", str(tmp_path / "none"))
    assert real.returncode == 1 and real.stdout == ""
    assert one_line(real.stderr).startswith("error: no trained model in")

    model = str(trained_once("bpe", 2))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    cases = [
        (["train", "--epochs", "0"], 2, "the number of epochs must be a whole number from 1 to 10000 (got '0')"),
        (["continue", "new.txt", "--resume", "--model-dir", model], 2, "not both"),
        (["chat", "--precision", "fp16", "--model-dir", model], 2, "fp16"),
        (["ask", "--model-dir", model], 2, "QUESTION"),
        (["status", "--model-dir", str(tmp_path / "none")], 1, "no trained model"),
        (["continue", "--resume", "--model-dir", model], 1, "no interrupted run"),
        (["export", str(busy), "--model-dir", model], 1, "--force"),
        (["export", str(tmp_path / "x"), "--format", "hf", "--model-dir", str(tmp_path / "none")], 1, "no trained"),
    ]
    for argv, status, words in cases:
        assert main(argv) == status, argv
        captured = capsys.readouterr()
        assert words in one_line(captured.err) and captured.out == "", argv
    monkeypatch.setattr(sys, "stdin", type("Terminal", (io.StringIO,), {"isatty": lambda self: True})())
    assert main(["generate", "--model-dir", model]) == 2
    assert "give a PROMPT" in one_line(capsys.readouterr().err)
    assert main(["export", "--help"]) == 0 and "--dtype" in capsys.readouterr().out


def test_chat_ask_and_info(trained_once, capsys, monkeypatch):
    model = str(trained_once("bpe", 2))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/temp 0\nWhat about the orchard?\n"))
    assert main(["chat", "--model-dir", model, "--seed", "3", "--max-new-tokens", "8"]) == 0  # ends at end of input
    out = capsys.readouterr().out
    assert out.count("AI: ") == 2 and "(temperature 0.0" in out

    assert main(["ask", "Where did the river run?", "--model-dir", model, "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr()
    assert answer.out.endswith("\n") and "Answer" not in answer.out

    assert main(["info", "--json", "--model-dir", model]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["n_layer"] == 1 and info["model"]["parameters"] > 0 and info["device"] == "cpu"
    assert main(["info", "--model-dir", model]) == 0 and "=== System Information ===" in capsys.readouterr().out


def test_a_closed_stdout_ends_the_command_quietly(tmp_path):
    """``interface.py info | head -1``: once the reader is gone, no "Broken pipe" error, and the
    exit status a process that SIGPIPE ended would have."""
    proc = subprocess.Popen(program("info", "--model-dir", str(tmp_path / "none")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.close()  # nothing reads stdout from now on: the program's first write fails
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == cli.EXIT_BROKEN_PIPE and err == ""


def test_status_plot_and_where_the_menu_says_it_is(trained_copy, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    model = trained_copy("bpe", 2)  # the folder the other tests here share
    assert main(["status", "--model-dir", str(model)]) == 0
    assert "none yet; draw them with: python interface.py status --plot" in capsys.readouterr().out
    assert main(["status", "--plot", "--model-dir", str(model)]) == 0
    png = model / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Loss curves (PNG)     {png}" in capsys.readouterr().out
    custom = tmp_path / "plots" / "loss.png"
    assert main(["status", "--json", "--plot", str(custom), "--model-dir", str(model)]) == 0
    assert json.loads(capsys.readouterr().out)["loss_plot"] == str(custom) and custom.exists()

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    assert main(["status", "--plot", "--model-dir", str(model)]) == 1
    assert "pip install -r requirements-plot.txt" in one_line(capsys.readouterr().err)


def test_loss_curves_follow_each_data_set():
    history = History.from_dict({
        "steps": [[1, 5.0, 0.1], [2, 4.0, 0.1], [3, 6.0, 0.1], [4, 5.5, 0.1]],
        "runs": [{"name": "novel", "start_step": 0, "epochs": 1, "tokens": 100},
                 {"name": "manual", "start_step": 2, "epochs": 1, "tokens": 100}],
        "evals": [{"step": 2, "val_loss": 4.5, "perplexity": 90.0, "bpb": 2.0, "val_tokens": 10, "dataset": "novel"},
                  {"step": 4, "val_loss": 5.9, "perplexity": 365.0, "bpb": 2.6, "val_tokens": 10,
                   "dataset": "manual"}]})
    curves = {c.name: c for c in loss_curves(history)}
    assert curves["novel"].train_steps == [1, 2] and curves["manual"].train_losses == [6.0, 5.5]
    assert curves["novel"].val_losses == [4.5] and curves["manual"].val_steps == [4]


def test_plain_progress_is_whole_lines():
    stream, shown = io.StringIO(), []
    progress = TrainingProgress(shown.append, stream=stream)  # not a terminal: plain mode
    assert progress.plain
    progress(EpochStarted(0, 2, 40, 0))
    for batch in range(1, 41):
        progress(StepDone(batch, 3.0, 1e-3, 1000.0, batch, 40))
    progress(Evaluated(EvalResult(2.5, 12.2, 1.9, 100, step=40, epoch=1)))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 10
    assert lines[-1].startswith("Epoch 1/2: batch 40/40 (100%) | loss 3.0000 | lr 1.00e-03 | step 40")
    assert shown == ["Validation after epoch 1: loss 2.5000 | perplexity 12.20 | 1.9000 bits/byte"]


def test_export_from_the_main_menu(trained_once, tmp_path):
    answers = iter(["4", "gguf", str(tmp_path / "m.gguf"), "f16", "4", "hf", str(tmp_path / "hf"), "5"])
    out = []
    code = main(["--model-dir", str(trained_once("bpe", 2))], lambda prompt: next(answers), out.append)
    text = "\n".join(out)
    assert code == 0 and "  4. Export" in text and "  5. Exit" in text
    assert f"Exported to {tmp_path / 'm.gguf'}" in text and f"Exported to {tmp_path / 'hf'}" in text
    assert (tmp_path / "m.gguf").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def test_finetune_on_a_conversation_file_makes_a_chat_model(trained_copy, tmp_path):
    from engine.data.chat_format import Message
    from engine.data.conversations import append_conversation

    folder = trained_copy("bpe", 1)
    chats = tmp_path / "chats.jsonl"
    append_conversation(chats, [Message("user", "Name a fruit."), Message("assistant", "An apple.")])
    (tmp_path / "bad.jsonl").write_text("not json\n")
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "finetune", str(chats), "--model-dir",
                           str(folder), "--chat-epochs", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "1 conversations" in proc.stdout + proc.stderr and "Training complete" in proc.stdout + proc.stderr
    assert json.loads((folder / "config.json").read_text())["chat_tuned"] is True
    bad = subprocess.run([sys.executable, str(ROOT / "interface.py"), "finetune", str(tmp_path / "bad.jsonl"),
                          "--model-dir", str(folder)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 1 and "no usable conversation" in bad.stderr and "Traceback" not in bad.stderr


def test_each_command_has_its_own_length_default():
    """A file trains for epochs, the built-in text and conversations for the first session's minutes; a
    length given is honoured (finetune --epochs was once silently replaced by --chat-epochs' default)."""
    def length(argv: list[str]) -> tuple[int, float]:
        args = cli.parse(argv)
        return args.epochs, args.minutes

    assert length(["train", "x.txt"]) == (cli.DEFAULT_EPOCHS, 0)
    assert length(["train"]) == (cli.BUILTIN_TEXT_LENGTH.epochs, cli.BUILTIN_TEXT_LENGTH.minutes)
    assert length(["finetune"]) == (cli.DEFAULT_CHAT_LENGTH.epochs, cli.DEFAULT_CHAT_LENGTH.minutes)
    assert cli.BUILTIN_TEXT_LENGTH.minutes + cli.DEFAULT_CHAT_LENGTH.minutes < 10  # tokenizers and loading fit too
    assert length(["train", "--epochs", "2"]) == (2, 0) and length(["finetune", "--minutes", "1"])[1] == 1
    assert cli.parse(["finetune", "--epochs", "2"]).epochs == 2
    assert cli.parse(["finetune", "--chat-epochs", "4"]).epochs == 4
    assert cli.parse(["continue", "x.txt", "--epochs", "5"]).epochs == 5


def test_the_menus_flags_may_stand_before_the_subcommand(trained_once, tmp_path, capsys, monkeypatch):
    """``--model-dir X status`` as ``git -C X status``; a flag's value that names a subcommand stays a value."""
    model = str(trained_once("bpe", 2))
    assert main(["--model-dir", model, "status"]) == 0
    assert f"Model folder          {model}" in capsys.readouterr().out
    assert main(["-v", f"--model-dir={model}", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_dir"] == model
    assert main(["--model-dir", str(tmp_path / "none"), "status", "--model-dir", model]) == 0  # the later one wins
    assert f"Model folder          {model}" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)  # a model folder named like a subcommand: the menu opens on it
    out = []
    assert main(["--model-dir", "train", "--tokenizer", "bpe"], lambda prompt: (_ for _ in ()).throw(EOFError),
                out.append) == 0
    assert "Model folder: train" in "\n".join(out) and out[-1] == "Goodbye."

    usage_errors = [
        (["--model-dir", model, "bogus"], "unknown subcommand 'bogus'; choose one of train, continue"),
        (["--epochs", "0", "train"], "the number of epochs must be a whole number from 1 to 10000 (got '0')"),
        (["--model-dir", model, "--json", "status"], "unrecognized arguments: --json"),
    ]
    for argv, words in usage_errors:
        with pytest.raises(SystemExit) as stop:  # the menu's parser: its usage errors exit as before
            main(argv)
        assert stop.value.code == 2 and words in one_line(capsys.readouterr().err), argv
    assert main(["--temperature", "0", "status", "--model-dir", model]) == 2  # a flag status does not take
    assert "unrecognized arguments: --temperature 0" in one_line(capsys.readouterr().err)


def test_line_editing_is_on_for_every_prompt_that_reads_a_terminal(trained_once, monkeypatch, capsys):
    """The menu and the subcommands turn readline on in one place, for a terminal on standard input."""
    import engine.app.console as console

    model = str(trained_once("bpe", 2))
    switched_on = []
    monkeypatch.setattr(console, "enable_line_editing", lambda: switched_on.append(True))
    monkeypatch.setattr(sys, "stdin", io.StringIO("/bye\n"))  # a pipe: left alone
    assert main(["chat", "--model-dir", model]) == 0 and switched_on == []
    monkeypatch.setattr(sys, "stdin", type("Terminal", (io.StringIO,), {"isatty": lambda self: True})("/bye\n"))
    assert main(["chat", "--model-dir", model]) == 0 and switched_on == [True]
    assert main(["--model-dir", model, "chat"]) == 0 and switched_on == [True, True]
    capsys.readouterr()


def test_the_default_model_folder_is_the_projects():
    assert cli.parse(["status"]).model_dir == str(ROOT / "custom_llm")


@pytest.mark.parametrize("command", [["finetune"], ["continue", "notes.txt"], ["status"]])
def test_under_torchrun_only_train_runs(tmp_path, command):
    """Every process of the job would otherwise run the subcommand on one folder."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    proc = subprocess.run(program(*command, "--model-dir", str(tmp_path / "m")), capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 2 and "only `interface.py train` runs" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "m").exists()
