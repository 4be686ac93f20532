"""Conversations to fine-tune on: files and folders of them, and the built-in set.

A file holds conversations in one of the forms ``conversation_formats`` reads
(OpenAI ``messages``, ShareGPT, Alpaca), detected from its first record:

- ``.jsonl``: one conversation a line;
- ``.json``: one list of conversations, one conversation, or JSON lines after all;
- ``.parquet``: one conversation a row, with the same fields as the JSON forms (needs
  the optional extra in ``requirements-parquet.txt``).

Bad records are reported by file and line (or row) and skipped: exported chat logs
often carry a few broken lines, and refusing thousands of good conversations for them
helps nobody. But when fewer than half the records are good, the file is refused:
that is the wrong format, not a few accidents. Identical conversations are kept once,
so the held-out part never repeats a training conversation word for word.

The built-in set is the Chit-Chat Challenge dataset (BYU Perception, Control and
Cognition lab; the ``chitchat-dataset`` package, MIT licence): conversations that people
had with each other about everyday things, installed with the program, so nothing is
downloaded. Of its 7,168 conversations, 4,011 distinct ones have two speakers (the rest
are one person waiting for a partner), 11.8 MB of text. One person's messages in a row form one turn (joined
by line breaks); the first person to speak is the user, the other the assistant.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.data.chat_format import Message
from engine.data.conversation_formats import ConversationForm, Reading, detect_form, read_record
from engine.runtime import storage

CONVERSATION_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_PROBLEMS_SHOWN = 5
PARQUET_EXTRA = "requirements-parquet.txt"
BUILTIN_CONVERSATIONS_NAME = "built-in conversations (Chit-Chat Challenge, English)"
CHAT_VAL_FRACTION = 0.1  # a tenth of the conversations is held out
MIN_TO_HOLD_OUT = 10
# TrainConfig's default seed. The built-in text leaves out the conversations that fine-tuning
# with it holds out, so their held-out loss measures conversations the model never saw.
DEFAULT_SEED = 1337
BUILTIN_CITATION = ("the Chit-Chat Challenge dataset of BYU's Perception, Control and Cognition lab "
                    "(pypi.org/project/chitchat-dataset, MIT licence)")


@dataclass
class ConversationSource:
    """Validated conversations, and what was skipped or adjusted on the way."""

    name: str
    conversations: list[list[Message]]
    problems: list[str] = field(default_factory=list)  # "file:line: what is wrong", the first few
    skipped: int = 0  # lines or entries left out because they were bad
    duplicates: int = 0  # identical conversations kept once
    forms: tuple[ConversationForm, ...] = ()  # the forms its files were in
    reading: Reading = field(default_factory=Reading)
    citation: str = ""  # where a built-in set comes from, and its licence

    @property
    def notes(self) -> list[str]:
        """One-line notes for the user about what was read, left out or adjusted."""
        notes = [f"skipped: {p}" for p in self.problems]
        if self.skipped > len(self.problems):
            notes.append(f"... {self.skipped - len(self.problems)} more bad line(s) skipped")
        if self.skipped:
            notes.append(f"{self.skipped} bad line(s) skipped; training on the other {len(self.conversations)}")
        if self.duplicates:
            notes.append(f"{self.duplicates} duplicate conversation(s) kept once")
        return notes + self.reading.notes

    @property
    def n_bytes(self) -> int:
        return sum(len(m.content.encode("utf-8")) for conv in self.conversations for m in conv)

    def content_hash(self) -> str:
        """SHA-256 of the conversations (the key of their token cache)."""
        h = hashlib.sha256()
        for conv in self.conversations:
            h.update(json.dumps([m.to_dict() for m in conv], ensure_ascii=False).encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()


@dataclass
class _Collected:
    """Conversations gathered from files, before duplicates are dropped."""

    good: list[list[Message]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seen: int = 0
    forms: list[ConversationForm] = field(default_factory=list)
    reading: Reading = field(default_factory=Reading)


def _unknown_form(record: object) -> str:
    if isinstance(record, dict) and record:
        keys = ", ".join(sorted(map(str, record))[:6])
        return (f"a record with the fields {keys}; expected \"messages\" list (OpenAI), \"conversations\" "
                "(ShareGPT) or \"instruction\"/\"output\" (Alpaca)")
    return "expected a \"messages\" list (OpenAI), \"conversations\" (ShareGPT) or \"instruction\"/\"output\" (Alpaca)"


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, decoded record) for every record of a file; where a record cannot be decoded,
    (where, the ValueError that says why)."""
    if path.suffix.lower() == ".parquet":
        yield from _parquet_records(path)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; conversation files must be UTF-8 JSON") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # perhaps JSON lines after all
        if detect_form(whole) is not None:  # one conversation (a list of them is no record of any form)
            whole = [whole]
        if isinstance(whole, list):
            for i, record in enumerate(whole):
                yield f"{path.name}: conversation {i + 1}", record
            return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path.name}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path.name}:{number}", ValueError(f"{path.name}:{number}: not JSON ({exc.msg})")


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path.name} needs pyarrow; run: python -m pip install -r {PARQUET_EXTRA}") from None
    try:
        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield f"{path.name}: row {row}", record
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot read {path} as Parquet: {str(exc).splitlines()[0]}") from None


def _read_file(path: Path, into: _Collected) -> None:
    """Add the file's valid conversations (in the form of its first record) to ``into``."""
    form = None
    reading = Reading()
    for where, record in _records(path):
        into.seen += 1
        if isinstance(record, ValueError):
            into.problems.append(str(record))
            continue
        form = form or detect_form(record)
        if form is None:
            into.problems.append(f"{where}: {_unknown_form(record)}")
            continue
        try:
            into.good.append(read_record(record, form, where, reading))
        except ValueError as exc:
            into.problems.append(str(exc))
    if form is not None and form not in into.forms:
        into.forms.append(form)
    into.reading.add(reading)


def _finish(name: str, collected: _Collected, citation: str = "") -> ConversationSource:
    """The conversations gathered, each kept once; refuses a source that is mostly not conversations."""
    good, problems, seen = collected.good, collected.problems, collected.seen
    if not good:
        detail = f": {problems[0]}" if problems else ""
        raise ValueError(f"{name} holds no usable conversation{detail}")
    if len(good) * 2 < seen:
        raise ValueError(f"{name}: only {len(good)} of {seen} lines are valid conversations, so this looks like "
                         f"another format (first problem: {problems[0]}); expected one conversation per line as "
                         "{\"messages\": [{\"role\": ..., \"content\": ...}]}, ShareGPT or Alpaca")
    unique, keys = [], set()
    for conv in good:
        key = tuple((m.role, m.content) for m in conv)
        if key not in keys:
            keys.add(key)
            unique.append(conv)
    return ConversationSource(name, unique, problems[:MAX_PROBLEMS_SHOWN], len(problems), len(good) - len(unique),
                              tuple(collected.forms), collected.reading, citation)


def open_conversation_files(spec: str) -> ConversationSource:
    """A conversation file or a folder of them (.jsonl, .json, .parquet), typed by the user."""
    spec = spec.strip().strip('"').strip("'")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CONVERSATION_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no .jsonl, .json or .parquet files")
    else:
        files = [path]
    collected = _Collected()
    for file in files:
        _read_file(file, collected)
    return _finish(str(path), collected)


def builtin_conversations() -> ConversationSource:
    """The built-in set: the Chit-Chat Challenge's 4,011 two-person conversations (see the module docstring)."""
    try:
        import chitchat_dataset
    except ImportError:
        raise ValueError("the built-in conversations need the package chitchat-dataset; "
                         "run: python -m pip install -r requirements.txt") from None
    data = storage.read_json(Path(chitchat_dataset.__file__).with_name("dataset.json"))
    conversations = []
    for key in sorted(data):  # the file's order is a dict's; sorted, the set is the same on every machine
        turns = []
        for turn in data[key]["messages"]:
            text = "\n".join(u["text"].strip() for u in turn if u["text"].strip())
            if not text:
                continue
            role = "user" if len(turns) % 2 == 0 else "assistant"
            if turns and turn[0]["sender"] == turns[-1][0]:  # one sender twice in a row: one turn
                turns[-1] = (turns[-1][0], Message(turns[-1][1].role, f"{turns[-1][1].content}\n{text}"))
            else:
                turns.append((turn[0]["sender"], Message(role, text)))
        messages = [m for _, m in turns]
        if len(messages) % 2:  # the last word was the first speaker's: it has no reply
            messages.pop()
        if messages:
            conversations.append(messages)
    return _finish(BUILTIN_CONVERSATIONS_NAME, _Collected(conversations, seen=len(conversations)), BUILTIN_CITATION)


def chatterbot_conversations() -> ConversationSource:
    """The English dialogues of chatterbot-corpus, each read as alternating user/assistant turns."""
    try:
        import yaml
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError:
        raise ValueError("this set needs the packages chatterbot-corpus and pyyaml") from None
    good: list[list[Message]] = []
    for path in sorted((Path(DATA_DIRECTORY) / "english").glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for entry in data.get("conversations") or []:
            if not isinstance(entry, list):  # one entry in the corpus is a stray string
                continue
            turns = [str(t).strip() for t in entry if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]  # a chain that ends with a question has no reply
            if turns:
                good.append([Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)])
    return _finish("chatterbot-corpus (English)", _Collected(good, seen=len(good)))


def open_conversations(spec: str) -> ConversationSource:
    """What the user typed: a conversation file or folder; nothing means the built-in set."""
    if not spec.strip().strip('"').strip("'"):
        return builtin_conversations()
    return open_conversation_files(spec)


def append_conversation(path: str | Path, messages: list[Message]) -> Path:
    """Add a conversation as one JSONL line to ``path`` (created if missing), atomically.

    The line is in the same form training reads, so saved chats can become training data.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as chats.jsonl")
    if not messages:
        raise ValueError("there is nothing to save yet")
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    line = json.dumps({"messages": [m.to_dict() for m in messages]}, ensure_ascii=False)
    storage.write_text(path, old + line + "\n")
    return path


def last_conversation(path: str | Path) -> list[Message]:
    """The last valid conversation in a conversation file (to continue it); a file with none
    is refused as ``open_conversation_files`` refuses it."""
    return open_conversation_files(str(path)).conversations[-1]


def split_conversations(conversations: list[list[Message]],
                        seed: int) -> tuple[list[list[Message]], list[list[Message]]]:
    """(training, held-out): a seeded shuffle, then a tenth held out.

    Fewer than ``MIN_TO_HOLD_OUT`` conversations are all trained on, and the "held-out"
    loss is then measured on them too: holding out one of three would teach a third
    less and measure nothing useful.
    """
    order = np.random.default_rng([seed, 7]).permutation(len(conversations))
    n_val = int(len(conversations) * CHAT_VAL_FRACTION) if len(conversations) >= MIN_TO_HOLD_OUT else 0
    val = [conversations[i] for i in order[:n_val]]
    train = [conversations[i] for i in order[n_val:]]
    return train, val or train


def conversation_document(conversation: list[Message]) -> str:
    """A conversation as plain text to pretrain on: one turn a line (a turn's own lines kept), no role names."""
    return "\n".join(line.strip() for m in conversation for line in m.content.splitlines() if line.strip())


def builtin_conversation_documents(seed: int = DEFAULT_SEED) -> list[str]:
    """The built-in conversations fine-tuning trains on (with ``seed``), each one document of plain text."""
    return [conversation_document(c) for c in split_conversations(builtin_conversations().conversations, seed)[0]]
