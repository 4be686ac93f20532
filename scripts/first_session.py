"""A new user's first session as one command: train, fine-tune, chat, then measure the replies.

    python scripts/first_session.py [--label L] [--json rows.jsonl] [--workdir DIR]
        [--mode menu|commands] [--text builtin|conversations|pydoc|both|PATH]
        [--conversations builtin|chatterbot|PATH] [--text-length 6m] [--chat-length 4m]
        [--tokenizer bpe|sentencepiece] [--say MESSAGE ...] [--openings N] [--dry-run]
        [-- FLAGS FOR interface.py]

Each row of the first-session table (issue 21) is one such command, and the row it
appends to ``--json`` records that command line and the commit it ran on.

``--mode menu`` (the default) is the real first session: ``python interface.py
--model-dir WORKDIR/model`` with Enter pressed at every question, and the menu numbers
that lead through Train from File, Train on Conversations and Chat (``MENU_STEPS``
below, the one place to update when the menus change). Each answer is typed only once
the menu shows the question it belongs to, so a changed menu stops the run at the
question it asked, instead of a misread answer training something else for minutes.
``--mode commands`` takes the same steps through ``interface.py train``, ``finetune``
and ``chat``, for variants the menu cannot ask for. Flags after ``--`` go to the menu,
or in commands mode to ``train`` (so no ``--seed``: that is a generation flag). The chat
sends each ``--say`` message (three everyday ones by default); the whole output is
kept in WORKDIR/session.txt, and the progress lines in WORKDIR/session.err.

The lengths are what a user would type at the length questions: empty (Enter, the
default), a number of epochs, or minutes such as ``6m`` (a time budget; the planner
then picks the model's shape). The data:

- ``--text``: ``builtin`` (Enter: the built-in corpus), a file or folder, or
  ``conversations``: the built-in conversations as plain text, one conversation a
  paragraph and one utterance a line (only the conversations fine-tuning trains on:
  the ones it holds out stay unseen, so their bits per byte still mean something;
  today's built-in corpus holds the same text, one conversation a document), or
  ``pydoc``: the Python documentation topics that every CPython ships (the built-in
  corpus before issue 21), one topic a file, or ``both``: those topics and that text.
- ``--conversations``: ``builtin`` (Enter: the Chit-Chat Challenge set), a JSONL file,
  or ``chatterbot``: the older chatterbot-corpus set, written to a JSONL file first.

Then the replies are measured in this process (``scripts/reply_quality.py``'s
``measure``, with the conversations the model was fine-tuned on), and one row is
printed and appended to ``--json``: the wall time of the whole session and of each
training phase, milliseconds per step, the model's shape and vocabulary (``interface.py
status --json``), the reply numbers and five sample replies, and the CPU (model name,
AVX-512, AMX) with the load average before and after, since timings depend on them.
A traceback, an "Error:" or a refused answer in the output, or a non-zero exit status,
stops the run and shows the end of the output; no row is written for it. The real
sessions take minutes: run them with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import codecs
import datetime
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.app.console import DEFAULT_EPOCHS, parse_training_length  # noqa: E402
from engine.data.chat_format import Message  # noqa: E402
from engine.data.conversations import (  # noqa: E402
    builtin_conversations,
    chatterbot_conversations,
    open_conversations,
    split_conversations,
)
from engine.folder.model_folder import ModelFolder  # noqa: E402
from engine.runtime.hardware import usable_cpu_cores  # noqa: E402
from engine.training.config import TrainConfig  # noqa: E402


@dataclass(frozen=True)
class MenuStep:
    """One question of the session and what to type at it."""

    prompt: str  # a regular expression that the question (the menu's last line of output) matches
    answer: str  # a menu number, or "{name}": the answer of that name that the flags give
    why: str
    starts: str = ""  # the phase the answer starts; it ends when the next question shows
    replies: bool = False  # the model answers this one: its output is generated text, not the menu's


# The first session, question by question; the numbers are positions in interface.py's
# MAIN_MENU, TRAINING_MENU and RESPONSE_MENU. "{say}" is one step per chat message.
MENU_STEPS = [
    MenuStep(r"Choose tokenizer", "{tokenizer}", "tokenizer (Enter: bpe)"),
    MenuStep(r"Choose 1-5", "1", "Main Menu -> Training"),
    MenuStep(r"Choose 1-6", "1", "Training Menu -> Train from File"),
    MenuStep(r"File or folder path", "{text}", "the text (Enter: the built-in corpus)"),
    MenuStep(r"Training length", "{text_length}", "its length (Enter: the default)", starts="pretrain"),
    MenuStep(r"Choose 1-6", "5", "Training Menu -> Train on Conversations"),
    MenuStep(r"Conversation file", "{conversations}", "the conversations (Enter: the built-in ones)"),
    MenuStep(r"Number of epochs|Training length", "{chat_length}", "their length (Enter: the default)",
             starts="finetune"),
    MenuStep(r"Choose 1-6", "6", "Training Menu -> Back to Main Menu"),
    MenuStep(r"Choose 1-5", "2", "Main Menu -> Response"),
    MenuStep(r"Choose 1-6", "2", "Response Menu -> Chat"),
    MenuStep(r"You: ", "{say}", "a chat message", replies=True),
    MenuStep(r"You: ", "/bye", "leave the chat"),
    MenuStep(r"Choose 1-6", "6", "Response Menu -> Back to Main Menu"),
    MenuStep(r"Choose 1-5", "5", "Main Menu -> Exit"),
]
SAY = "{say}"
DEFAULT_SAY = ["Hi there! How are you today?", "What do you like to do on weekends?", "That sounds nice. Why?"]
# Output that ends in a question ("...: ", no newline) the script did not expect, with
# nothing more printed for this long, is a changed menu. Long silent work (a tokenizer,
# loading data) comes after a finished line, so it never looks like a question.
STALL_S = 10.0
PROBLEM = re.compile(r"Traceback \(most recent call last\)|\bError: |^error: |Invalid (?:choice|number|length)"
                     r"|\(cancelled\)", re.MULTILINE)
PROGRESS_STEP = re.compile(r"\| step (\d+) \|")
NOTE = re.compile(r"Note: (.+)")
RUN_STARTED = re.compile(r"Training \S+ parameters on .*?: [\d,]+ training tokens, [^,]*")
SAMPLES = 5


class SessionFailed(Exception):
    """The session went wrong: the message says where, with the end of the output."""


# -- reading a child's output as it comes -------------------------------------------------------

class PipeReader:
    """Everything a child writes to one pipe, read by a thread as it comes.

    ``text`` grows with every read (a question has no newline, so reading by lines would
    never see it); ``lines`` holds each finished line with the time it ended.
    """

    def __init__(self, pipe, changed: threading.Condition) -> None:
        self.text = ""
        self.lines: list[tuple[float, str]] = []
        self.last_output = time.monotonic()
        self.closed = False
        self._line_start = 0
        self._pipe, self._changed = pipe, changed
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = os.read(self._pipe.fileno(), 1 << 16)
            now = time.monotonic()
            with self._changed:
                self.text += decoder.decode(chunk, final=not chunk)
                while (end := self.text.find("\n", self._line_start)) >= 0:
                    self.lines.append((now, self.text[self._line_start:end]))
                    self._line_start = end + 1
                self.last_output, self.closed = now, not chunk
                self._changed.notify_all()
            if not chunk:
                return

    def join(self) -> None:
        self._thread.join()


@dataclass(frozen=True)
class Invocation:
    """One run of interface.py: its arguments, the questions it asks, the phase it is."""

    argv: list[str]
    steps: list[MenuStep]
    phase: str = ""  # the whole run is this phase (commands mode); the menu's steps name their own
    budget: str = ""  # the whole run was asked to train for these minutes (commands mode)


@dataclass
class Driven:
    """What one invocation did."""

    stdout: str
    stderr: str
    wall_s: float
    phases: dict[str, float]  # seconds each phase took
    progress: list[tuple[float, int]]  # (time, global step) of each progress line
    exchanges: list[tuple[str, str]]  # (chat message, the output that followed it)
    notes: list[str]  # the program's notes (not the model's replies)


class Dialogue:
    """Answers a running program's questions one at a time, each when it is asked.

    ``budget`` is the length answer of the training run under way when it asks for
    minutes ('' otherwise): a run that starts with a number of epochs instead is stopped
    at once (a program that ignores the minutes would train for its default epochs).
    """

    def __init__(self, proc: subprocess.Popen, changed: threading.Condition, deadline: float, budget: str) -> None:
        self.proc, self.changed, self.deadline, self.budget = proc, changed, deadline, budget
        self.out, self.err = PipeReader(proc.stdout, changed), PipeReader(proc.stderr, changed)
        self.since = 0  # where the output after the last answer starts
        self.last_answer = "(none yet)"
        self.phases: dict[str, float] = {}
        self.exchanges: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def run(self, steps: list[MenuStep]) -> None:
        started: tuple[str, float] | None = None
        for i, step in enumerate(steps):
            generated = i > 0 and steps[i - 1].replies
            asked_at = self.wait_for(step, generated)
            if generated:
                self.exchanges.append((steps[i - 1].answer, self.out.text[self.since:].rpartition("\n")[0]))
            else:
                self.notes += NOTE.findall(self.out.text[self.since:])
            if started is not None:
                self.phases[started[0]] = asked_at - started[1]
                started = None
            self.since, self.last_answer = len(self.out.text), f"{step.answer!r} ({step.why})"
            self.budget = step.answer if step.starts and is_budget(step.answer) else ""
            self.proc.stdin.write(f"{step.answer}\n".encode())
            self.proc.stdin.flush()
            if step.starts:
                started = (step.starts, time.monotonic())
        self.proc.stdin.close()

    def wait_for(self, step: MenuStep, generated: bool) -> float:
        """Wait until the program asks ``step``'s question; returns when it did."""
        with self.changed:
            while True:
                tail = self.out.text[self.since:]
                question = tail.rpartition("\n")[2]
                if question.endswith(": ") and re.search(step.prompt, question):
                    return self.out.last_output
                if not generated:
                    self.check(tail)
                if self.out.closed:
                    raise SessionFailed(f"the program ended before asking {step.prompt!r} ({step.why})")
                quiet = time.monotonic() - max(self.out.last_output, self.err.last_output)
                if question.endswith(": ") and quiet > STALL_S:
                    raise SessionFailed(f"the program asks {question!r}, but the script expected {step.prompt!r} "
                                        f"({step.why}): update MENU_STEPS")
                self.wait(f"waiting for {step.prompt!r} ({step.why})")

    def wait_for_end(self, generated: bool) -> None:
        """Wait until the program has closed its output (it has all its answers)."""
        with self.changed:
            while not (self.out.closed and self.err.closed):
                if not generated:
                    self.check(self.out.text[self.since:])
                self.wait("waiting for the program to end")
            if not generated:
                self.check(self.out.text[self.since:])

    def check(self, output: str) -> None:
        """SessionFailed for an error, a refused answer, or a budget run that started with epochs."""
        if problem := PROBLEM.search(output):
            line = output[output.rfind("\n", 0, problem.start()) + 1:].partition("\n")[0]
            raise SessionFailed(f"after {self.last_answer} the program says: {line}")
        start = RUN_STARTED.search(output)
        if self.budget and start and "minute" not in start.group(0):
            raise SessionFailed(f"asked to train for {self.budget}, the program started {start.group(0)!r}: this "
                                "interface.py does not train for minutes there yet (give a number of epochs)")

    def wait(self, doing: str) -> None:
        if time.monotonic() > self.deadline:
            raise SessionFailed(f"--timeout passed while {doing}")
        self.changed.wait(1.0)


def drive(invocation: Invocation, timeout_s: float) -> Driven:
    """Run ``invocation`` to its end, answering its questions; SessionFailed if anything went wrong."""
    started = time.monotonic()
    proc = subprocess.Popen(invocation.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    dialogue = Dialogue(proc, threading.Condition(), started + timeout_s, invocation.budget)
    generated_last = bool(invocation.steps) and invocation.steps[-1].replies
    try:
        dialogue.run(invocation.steps)
        dialogue.wait_for_end(generated_last)
        proc.wait(timeout=max(1.0, dialogue.deadline - time.monotonic()))
    except (SessionFailed, subprocess.TimeoutExpired, BrokenPipeError) as exc:
        proc.kill()
        proc.wait()
        dialogue.out.join()
        dialogue.err.join()
        raise SessionFailed(f"{shlex.join(invocation.argv[1:])}: {exc}\n{output_end(dialogue)}") from None
    wall = time.monotonic() - started
    dialogue.out.join()
    dialogue.err.join()
    error = re.search(r"Traceback|^error: .*", dialogue.err.text, re.MULTILINE)
    if proc.returncode != 0 or error:
        why = f"exit status {proc.returncode}" if proc.returncode else f"stderr says {error.group(0)!r}"
        if proc.returncode == 2 and invocation.budget:
            why += f" (a usage error: does this interface.py take {shlex.join(length_flags(invocation.budget))} here?)"
        raise SessionFailed(f"{shlex.join(invocation.argv[1:])}: {why}\n{output_end(dialogue)}")
    phases = dict(dialogue.phases)
    if invocation.phase:
        phases[invocation.phase] = wall
    progress = [(t, int(m.group(1))) for t, line in dialogue.err.lines if (m := PROGRESS_STEP.search(line))]
    last_part = "" if generated_last else dialogue.out.text[dialogue.since:]
    notes = dialogue.notes + NOTE.findall(last_part) + NOTE.findall(dialogue.err.text)
    return Driven(dialogue.out.text, dialogue.err.text, wall, phases, progress, dialogue.exchanges, notes)


def output_end(dialogue: Dialogue, chars: int = 3000) -> str:
    return (f"--- end of stdout ---\n{dialogue.out.text[-chars:]}\n"
            f"--- end of stderr ---\n{dialogue.err.text[-chars:]}")


# -- what to run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answers:
    """What the user types at the session's questions ('' is Enter)."""

    tokenizer: str
    text: str
    text_length: str
    conversations: str
    chat_length: str
    say: list[str] = field(default_factory=list)


def filled_steps(steps: list[MenuStep], answers: Answers) -> list[MenuStep]:
    """The steps with the answers filled in; the chat step once per message."""
    filled = []
    for step in steps:
        if step.answer == SAY:
            filled += [replace(step, answer=message) for message in answers.say]
        else:
            filled.append(replace(step, answer=step.answer.format(**asdict(answers))))
    return filled


def is_budget(answer: str) -> bool:
    """Whether a length answer asks for minutes."""
    return length_flags(answer)[:1] == ["--minutes"]


def length_flags(answer: str) -> list[str]:
    """A length answer as the command line's flags: '6m' -> --minutes 6, '3' -> --epochs 3, '' -> none."""
    if not answer.strip():
        return []
    length = parse_training_length(answer, DEFAULT_EPOCHS)
    return ["--minutes", f"{length.minutes:g}"] if length.minutes else ["--epochs", str(length.epochs)]


def invocations(mode: str, answers: Answers, model_dir: Path, flags: list[str]) -> list[Invocation]:
    """The runs of interface.py a session in ``mode`` takes."""
    interface = [sys.executable, str(ROOT / "interface.py")]
    where = ["--model-dir", str(model_dir)]
    if mode == "menu":
        return [Invocation([*interface, *where, *flags], filled_steps(MENU_STEPS, answers))]
    tokenizer = ["--tokenizer", answers.tokenizer] if answers.tokenizer else []
    chat_steps = [s for s in filled_steps(MENU_STEPS, answers) if s.prompt == "You: "]
    return [
        Invocation([*interface, "train", *filter(None, [answers.text]), *where, *tokenizer,
                    *length_flags(answers.text_length), *flags], [], "pretrain",
                   answers.text_length if is_budget(answers.text_length) else ""),
        Invocation([*interface, "finetune", *filter(None, [answers.conversations]), *where,
                    *length_flags(answers.chat_length)], [], "finetune",
                   answers.chat_length if is_budget(answers.chat_length) else ""),
        Invocation([*interface, "chat", *where], chat_steps, "chat"),
    ]


# -- the data a variant trains on ---------------------------------------------------------------

def conversations_as_text(conversations: list[list[Message]]) -> str:
    """One conversation a paragraph, one utterance a line (a turn of several lines keeps them all)."""
    paragraphs = ["\n".join(line.strip() for m in conv for line in m.content.splitlines() if line.strip())
                  for conv in conversations]
    return "\n\n".join(p for p in paragraphs if p) + "\n"


def training_conversations(seed: int) -> list[list[Message]]:
    """The built-in conversations fine-tuning trains on (``split_conversations`` holds out the rest)."""
    return split_conversations(builtin_conversations().conversations, seed)[0]


def text_answer(choice: str, workdir: Path, seed: int, write: bool) -> str:
    """What to type at the text question for ``--text``; writes the file or folder it names."""
    if choice == "builtin":
        return ""
    if choice not in ("conversations", "both", "pydoc"):
        return str(Path(choice).expanduser().resolve())
    target = workdir / {"conversations": "conversations.txt", "both": "text-both", "pydoc": "text-pydoc"}[choice]
    if write:
        text = conversations_as_text(training_conversations(seed))
        if choice == "conversations":
            target.write_text(text, encoding="utf-8")
        else:  # each documentation topic its own file: one document each
            from pydoc_data.topics import topics

            (target / "python-docs").mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(sorted(topics)):
                (target / "python-docs" / f"{i:03d}.txt").write_text(topics[name], encoding="utf-8")
            if choice == "both":
                (target / "conversations.txt").write_text(text, encoding="utf-8")
    return str(target)


def conversations_answer(choice: str, workdir: Path, write: bool) -> str:
    """What to type at the conversations question for ``--conversations``; writes the chatterbot file."""
    if choice == "builtin":
        return ""
    if choice != "chatterbot":
        return str(Path(choice).expanduser().resolve())
    target = workdir / "chatterbot.jsonl"
    if write:
        target.write_text("".join(json.dumps({"messages": [m.to_dict() for m in conv]}, ensure_ascii=False) + "\n"
                                  for conv in chatterbot_conversations().conversations), encoding="utf-8")
    return str(target)


def train_seed(flags: list[str]) -> int:
    """The seed that splits the conversations: --train-seed among the flags, or the default."""
    for i, flag in enumerate(flags[:-1]):
        if flag == "--train-seed":
            return int(flags[i + 1])
    return TrainConfig().seed


# -- the machine --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cpu:
    model: str
    avx512: bool
    amx: bool
    cores: int  # the cores this process may use


def describe_cpu() -> Cpu:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    name = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    flag_line = re.search(r"^Flags:\s*(.+)$", lscpu, re.MULTILINE)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    return Cpu(name.group(1).strip() if name else "unknown", any(f.startswith("avx512") for f in flags),
               any(f.startswith("amx") for f in flags), usable_cpu_cores())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def commit() -> str:
    """The commit this ran on ('+' when the working tree had changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no")
                                                       else "")
    except OSError:
        return "unknown"


# -- the row ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One training phase: its wall time, its steps and the time a step took."""

    seconds: float | None  # from the answer that started it to the next question (the menu), or the process
    steps: int
    ms_per_step: float | None  # between the phase's first and last progress line (validations included)
    budget_minutes: float  # the time budget its run record holds (0: an epoch count)


@dataclass
class Row:
    """One row of the first-session table, as the JSON line holds it."""

    label: str
    command: str  # this script's command line: rerunning it reproduces the row
    commit: str
    date: str
    mode: str
    text: str
    conversations: str
    text_length: str  # '' is Enter: the default
    chat_length: str
    flags: list[str]
    wall_s: float  # every process of the session, start to exit, chat included
    pretrain: Phase
    finetune: Phase
    shape: str
    vocab_size: int
    parameters: int
    quality: dict  # reply_quality.ReplyQuality
    samples: list[dict]  # the first replies of the measure: opening, text
    chat: list[dict]  # the session's own chat: message, output
    notes: list[str]
    cpu: Cpu
    load_before: list[float]
    load_after: list[float]
    measure_s: float
    workdir: str


def folder_status(model_dir: Path) -> dict:
    """``interface.py status --json``: the model's shape and vocabulary, and its runs."""
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "status", "--json", "--model-dir",
                           str(model_dir)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SessionFailed(f"interface.py status --json: exit status {proc.returncode}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def phase(status: dict, kind: str, driven: list[Driven], name: str) -> Phase:
    """The first run of ``kind`` ('text' or 'chat') in the status, timed by the session's output."""
    runs = status["runs"]
    i = next((i for i, run in enumerate(runs) if run["kind"] == kind), None)
    if i is None:
        raise SessionFailed(f"the model folder records no {kind} run: the {name} phase did not train")
    first, last = runs[i]["start_step"], runs[i + 1]["start_step"] if i + 1 < len(runs) else status["steps"]
    seen = [(t, step) for d in driven for t, step in d.progress if first < step <= last]
    ms = None
    if len(seen) >= 2 and seen[-1][1] > seen[0][1]:
        ms = 1000 * (seen[-1][0] - seen[0][0]) / (seen[-1][1] - seen[0][1])
    seconds = next((d.phases[name] for d in driven if name in d.phases), None)
    return Phase(seconds, last - first, ms, runs[i]["minutes"])


def check_budget(length: str, got: Phase, what: str) -> None:
    """A length in minutes that the program ran as epochs is a row that lies: stop."""
    if is_budget(length) and not got.budget_minutes:
        raise SessionFailed(f"{what} was asked to train for {length} but its run record holds no time budget: "
                            "this interface.py does not take minutes there yet (give a number of epochs)")


def load_reply_quality():
    """scripts/reply_quality.py as a module (scripts is no package)."""
    spec = importlib.util.spec_from_file_location("reply_quality", ROOT / "scripts" / "reply_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reply_quality"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def print_row(row: Row, rq, quality, replies) -> None:
    def timed(name: str, p: Phase) -> str:
        seconds = f"{p.seconds:.1f} s" if p.seconds is not None else "?"
        per_step = f", {p.ms_per_step:.0f} ms/step" if p.ms_per_step is not None else ""
        return f"{name} {seconds} ({p.steps:,} steps{per_step})"

    cpu = row.cpu
    extras = ", ".join(name for name, has in (("AVX-512", cpu.avx512), ("AMX", cpu.amx)) if has) or "no AVX-512/AMX"
    print(f"\n== {row.label} ==")
    for exchange in row.chat:
        print(f"You: {exchange['message']}\n{exchange['output']}")
    for reply in replies[:SAMPLES]:
        print(f"> {reply.opening}\n  {reply.text!r}")
    print(f"wall {row.wall_s:.1f} s | {timed('pretrain', row.pretrain)} | {timed('finetune', row.finetune)} | "
          f"{row.shape}, vocabulary {row.vocab_size:,}, {row.parameters:,} parameters")
    print(f"CPU {cpu.model} ({extras}), {cpu.cores} cores | load average {row.load_before} -> {row.load_after}")
    rq.print_quality(row.label, quality)


# -- the command --------------------------------------------------------------------------------

def length_answer(text: str) -> str:
    """An argparse type: a length as typed at the menu ('' Enter, '3' epochs, '6m' minutes)."""
    try:
        length_flags(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and those after ``--`` (for interface.py)."""
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                usage="%(prog)s [options] [-- FLAGS FOR interface.py]")
    p.add_argument("--label", help="the row's name (default: from the options)")
    p.add_argument("--mode", choices=("menu", "commands"), default="menu")
    p.add_argument("--workdir", help="a folder for the model and the data files (default: a new temporary one)")
    p.add_argument("--json", metavar="FILE", help="append the row here as a JSON line")
    p.add_argument("--text", default="builtin", help="builtin, conversations, pydoc, both, or a file or folder")
    p.add_argument("--conversations", default="builtin", help="builtin, chatterbot, or a JSONL file")
    p.add_argument("--text-length", type=length_answer, default="", help="typed at the text's length question")
    p.add_argument("--chat-length", type=length_answer, default="", help="typed at the conversations' length")
    p.add_argument("--tokenizer", default="", choices=("", "bpe", "sentencepiece"), help="default: Enter (bpe)")
    p.add_argument("--say", action="append", help=f"a chat message (repeat it; default: {DEFAULT_SAY})")
    p.add_argument("--openings", type=int, metavar="N",
                   help="measure only the first N openings (quick checks; the table uses all)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one interface.py run may take")
    p.add_argument("--dry-run", action="store_true", help="print the commands and the lines typed, run nothing")
    return p.parse_args(argv), flags


def print_plan(runs: list[Invocation], preparing: list[str]) -> None:
    for line in preparing:
        print(line)
    for run in runs:
        print(f"$ {shlex.join(run.argv)}")
        for step in run.steps:
            print(f"  {step.answer!r:<36} at {step.prompt!r}: {step.why}")
        if run.steps:
            print(f"  stdin: {json.dumps([step.answer for step in run.steps])}")


def run_session(runs: list[Invocation], timeout_s: float) -> list[Driven]:
    driven = []
    for run in runs:
        print(f"$ {shlex.join(run.argv)}", flush=True)
        driven.append(drive(run, timeout_s))
    return driven


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, flags = parse_args(argv)
    if args.dry_run:
        workdir = Path(args.workdir or "WORKDIR")
    else:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="first-session-")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    if model_dir.exists():
        print(f"error: {model_dir} exists; a first session needs a new model folder (another --workdir)",
              file=sys.stderr)
        return 2
    write = not args.dry_run
    answers = Answers(args.tokenizer, text_answer(args.text, workdir, train_seed(flags), write), args.text_length,
                      conversations_answer(args.conversations, workdir, write), args.chat_length,
                      args.say or DEFAULT_SAY)
    runs = invocations(args.mode, answers, model_dir, flags)
    if args.dry_run:
        made = [f"# writes {path}" for path in (answers.text, answers.conversations) if path.startswith("WORKDIR")]
        print_plan(runs, made)
        return 0
    if importlib.util.find_spec("wordfreq") is None:  # found out before the session, not after it
        print("error: the reply measure needs wordfreq: python -m pip install -r requirements-bench.txt",
              file=sys.stderr)
        return 2
    args.label = args.label or (f"{args.mode} text={args.text} conversations={args.conversations} "
                                f"lengths={args.text_length or 'Enter'}/{args.chat_length or 'Enter'}")
    try:
        row, quality, replies, rq = measured_session(args, argv, flags, answers, runs, model_dir)
    except SessionFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_row(row, rq, quality, replies)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
    return 0


def measured_session(args: argparse.Namespace, argv: list[str], flags: list[str], answers: Answers,
                     runs: list[Invocation], model_dir: Path):
    """Run the session, read the folder, measure the replies: (row, quality, replies, reply_quality)."""
    cpu, load_before = describe_cpu(), load_average()
    driven = run_session(runs, args.timeout)
    load_after = load_average()
    (model_dir.parent / "session.txt").write_text("".join(d.stdout for d in driven), encoding="utf-8")
    (model_dir.parent / "session.err").write_text("".join(d.stderr for d in driven), encoding="utf-8")
    status = folder_status(model_dir)
    pretrain, finetune = phase(status, "text", driven, "pretrain"), phase(status, "chat", driven, "finetune")
    check_budget(answers.text_length, pretrain, "training on text")
    check_budget(answers.chat_length, finetune, "training on conversations")
    rq = load_reply_quality()
    if args.openings:
        rq.OPENINGS = rq.OPENINGS[:args.openings]
    started = time.monotonic()
    quality, replies = rq.measure(model_dir, open_conversations(answers.conversations).conversations)
    m = status["model"]
    row = Row(label=args.label, command=shlex.join(["python", "scripts/first_session.py", *argv]), commit=commit(),
              date=datetime.datetime.now().isoformat(timespec="seconds"), mode=args.mode, text=args.text,
              conversations=args.conversations, text_length=args.text_length, chat_length=args.chat_length,
              flags=flags, wall_s=sum(d.wall_s for d in driven), pretrain=pretrain, finetune=finetune,
              shape=f"d{m['d_model']} x{m['n_layer']} h{m['n_head']} ctx{m['context']}", vocab_size=m["vocab_size"],
              parameters=ModelFolder(model_dir).summary().parameters, quality=asdict(quality),
              samples=[{"opening": r.opening, "text": r.text} for r in replies[:SAMPLES]],
              chat=[{"message": message, "output": output} for d in driven for message, output in d.exchanges],
              notes=[note for d in driven for note in d.notes], cpu=cpu, load_before=load_before,
              load_after=load_after, measure_s=time.monotonic() - started, workdir=str(model_dir.parent))
    return row, quality, replies, rq


if __name__ == "__main__":
    sys.exit(main())
