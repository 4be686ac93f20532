"""The first-session runner (scripts/first_session.py): its menu table against the menus, its
command lines, and one whole tiny session through the real menu, measured."""
import importlib.util
import json
import re
import subprocess
import sys

import pytest

from engine.data.chat_format import Message
from interface import MAIN_MENU, RESPONSE_MENU, TRAINING_MENU

from conftest import ROOT, SAMPLE_TEXT, TINY_CLI

SCRIPT = ROOT / "scripts" / "first_session.py"
spec = importlib.util.spec_from_file_location("first_session", SCRIPT)
fs = importlib.util.module_from_spec(spec)
sys.modules["first_session"] = fs  # dataclasses look their module up there
spec.loader.exec_module(fs)


def test_the_menu_numbers_lead_where_the_table_says():
    """Each 'Menu -> Entry' step types that entry's number, at that menu's question."""
    menus = {title: [label for label, _ in options] for title, options in (MAIN_MENU, TRAINING_MENU, RESPONSE_MENU)}
    navigation = [step for step in fs.MENU_STEPS if " -> " in step.why]
    for step in navigation:
        title, _, label = step.why.partition(" -> ")
        assert menus[title][int(step.answer) - 1] == label, step
        assert re.search(step.prompt, f"Choose 1-{len(menus[title])}: "), step
    assert len(navigation) == 8


def test_enter_everywhere_is_what_the_menu_gets_by_default(capsys):
    assert fs.main(["--dry-run", "--workdir", "W"]) == 0
    stdin = json.loads(capsys.readouterr().out.split("stdin: ")[1].splitlines()[0])
    assert stdin == ["", "1", "1", "", "", "5", "", "", "6", "2", "2", *fs.DEFAULT_SAY, "/bye", "6", "5"]


def test_commands_mode_turns_the_typed_lengths_into_flags(capsys):
    assert fs.main(["--dry-run", "--mode", "commands", "--workdir", "W", "--text", "conversations",
                    "--conversations", "chatterbot", "--text-length", "6m", "--chat-length", "3", "--",
                    "--preset", "compact"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert lines[0].endswith("train W/conversations.txt --model-dir W/model --minutes 6 --preset compact")
    assert lines[1].endswith("finetune W/chatterbot.jsonl --model-dir W/model --epochs 3")
    assert lines[2].endswith("chat --model-dir W/model")
    assert fs.length_flags("") == [] and fs.length_flags("2.5 min") == ["--minutes", "2.5"]


def test_conversations_as_text_is_a_paragraph_each_and_an_utterance_a_line():
    convs = [[Message("user", "Hi!"), Message("assistant", "Hello.\n\nHow are you?")],
             [Message("user", "Bye"), Message("assistant", "See you")]]
    assert fs.conversations_as_text(convs) == "Hi!\nHello.\nHow are you?\n\nBye\nSee you\n"


@pytest.fixture
def tiny_data(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    chats = tmp_path / "chats.jsonl"
    convs = [[("user", f"Do you like {w}?"), ("assistant", f"Yes, I like {w} a lot.")]
             for w in "tea coffee cats dogs rain snow music books trains rivers".split()]
    chats.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n"
                             for conv in convs), encoding="utf-8")
    return text, chats


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_a_tiny_first_session_through_the_menu_is_one_row(tmp_path, tiny_data):
    pytest.importorskip("wordfreq", reason="the reply measure needs wordfreq (requirements-bench.txt)")
    text, chats = tiny_data
    rows = tmp_path / "rows.jsonl"
    proc = run_script("--label", "tiny", "--workdir", str(tmp_path / "work"), "--text", str(text),
                      "--conversations", str(chats), "--text-length", "1", "--chat-length", "1", "--say", "Hello!",
                      "--openings", "4", "--json", str(rows), "--", *TINY_CLI)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-3000:]
    row = json.loads(rows.read_text(encoding="utf-8").splitlines()[-1])
    assert row["label"] == "tiny" and row["mode"] == "menu" and row["flags"] == TINY_CLI
    assert row["command"].startswith("python scripts/first_session.py --label tiny")
    assert row["wall_s"] > 0 and row["pretrain"]["seconds"] > 0 and row["finetune"]["seconds"] > 0
    assert row["pretrain"]["seconds"] + row["finetune"]["seconds"] < row["wall_s"]
    assert row["pretrain"]["steps"] > 0 and row["finetune"]["steps"] > 0 and row["pretrain"]["ms_per_step"] > 0
    assert row["shape"] == "d32 x1 h2 ctx32" and 256 < row["vocab_size"] <= 320 and row["parameters"] > 0
    q = row["quality"]
    assert q["replies"] == 4 and all(0 <= q[k] <= 1 for k in ("english_words", "turn_end", "role_leaks", "distinct_2"))
    assert q["held_out_bpb"] > 0 and q["mean_words"] >= 0
    assert len(row["samples"]) == 4 and [c["message"] for c in row["chat"]] == ["Hello!"]
    assert row["chat"][0]["output"].startswith("AI: ")
    assert row["cpu"]["cores"] >= 1 and len(row["load_before"]) == len(row["load_after"]) == 3
    assert "Training complete" in (tmp_path / "work" / "session.txt").read_text(encoding="utf-8")
    assert "English words" in proc.stdout and "tiny" in proc.stdout


def test_an_error_in_the_session_stops_it_without_a_row(tmp_path, tiny_data):
    pytest.importorskip("wordfreq", reason="without wordfreq the script stops before the session")
    _, chats = tiny_data
    rows = tmp_path / "rows.jsonl"
    proc = run_script("--workdir", str(tmp_path / "work"), "--text", str(tmp_path / "missing.txt"),
                      "--conversations", str(chats), "--json", str(rows), "--", *TINY_CLI)
    assert proc.returncode == 1
    assert "missing.txt' (the text (Enter: the built-in corpus)) the program says: Error: no such file" in proc.stderr
    assert not rows.exists()
