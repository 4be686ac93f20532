"""Conversations to fine-tune on: JSONL files, folders of them, or the built-in set.

A file holds one conversation a line, in the form most tools export::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, ...]}

or a bare JSON array of such messages. A ``.json`` file may also hold one list of
conversations. Every line is checked (JSON, known roles, non-empty content, roles
alternating after an optional system message, at least one assistant reply).

Bad lines are reported by file and line and skipped: exported chat logs often carry
a few broken lines, and refusing thousands of good conversations for them helps
nobody. But when fewer than half the lines are good, the file is refused: that is the
wrong format, not a few accidents. Identical conversations are kept once, so the
held-out part never repeats a training conversation word for word.

The built-in set is the English part of ``chatterbot-corpus`` (BSD-3-Clause), about
240 KB of short dialogues installed with the program: nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.chat_format import Message, check_messages
from engine.runtime import storage

CONVERSATION_SUFFIXES = (".jsonl", ".json")
BUILTIN_CONVERSATIONS_NAME = "built-in conversations (chatterbot-corpus, English)"
MAX_PROBLEMS_SHOWN = 5


@dataclass
class ConversationSource:
    """Validated conversations, and what was skipped on the way."""

    name: str
    conversations: list[list[Message]]
    problems: list[str] = field(default_factory=list)  # "file:line: what is wrong", the first few
    skipped: int = 0  # lines or entries left out because they were bad
    duplicates: int = 0  # identical conversations kept once

    @property
    def notes(self) -> list[str]:
        """One-line notes for the user about what was left out."""
        notes = [f"skipped: {p}" for p in self.problems]
        if self.skipped > len(self.problems):
            notes.append(f"... {self.skipped - len(self.problems)} more bad line(s) skipped")
        if self.skipped:
            notes.append(f"{self.skipped} bad line(s) skipped; training on the other {len(self.conversations)}")
        if self.duplicates:
            notes.append(f"{self.duplicates} duplicate conversation(s) kept once")
        return notes

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


def parse_messages(value, where: str) -> list[Message]:
    """A conversation from decoded JSON: {"messages": [...]} or a bare list of messages."""
    if isinstance(value, dict):
        if "messages" not in value:
            raise ValueError(f"{where}: an object needs a \"messages\" list")
        value = value["messages"]
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of messages or {{\"messages\": [...]}}")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise ValueError(f"{where}: message {i + 1} needs \"role\" and \"content\"")
        if not isinstance(item["content"], str):
            raise ValueError(f"{where}: message {i + 1} content must be text")
        messages.append(Message(str(item["role"]), item["content"]))
    try:
        check_messages(messages)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return messages


def _is_one_conversation(value) -> bool:
    return (isinstance(value, dict) and "messages" in value) or (
        isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value))


def _read_file(path: Path, good: list[list[Message]], problems: list[str]) -> int:
    """Append the file's valid conversations to ``good``; returns the lines (entries) seen."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; conversation files must be UTF-8 JSON lines") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # perhaps JSON lines after all
        if _is_one_conversation(whole):
            whole = [whole]
        if isinstance(whole, list):  # a list of conversations
            for i, conv in enumerate(whole):
                try:
                    good.append(parse_messages(conv, f"{path.name}: conversation {i + 1}"))
                except ValueError as exc:
                    problems.append(str(exc))
            return len(whole)
    seen = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        seen += 1
        where = f"{path.name}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc.msg})")
            continue
        try:
            good.append(parse_messages(value, where))
        except ValueError as exc:
            problems.append(str(exc))
    return seen


def _finish(name: str, good: list[list[Message]], problems: list[str], seen: int) -> ConversationSource:
    if not good:
        detail = f": {problems[0]}" if problems else ""
        raise ValueError(f"{name} holds no usable conversation{detail}")
    if len(good) * 2 < seen:
        raise ValueError(f"{name}: only {len(good)} of {seen} lines are valid conversations, so this looks like "
                         f"another format (first problem: {problems[0]}); expected one "
                         "{\"messages\": [{\"role\": ..., \"content\": ...}]} per line")
    unique, keys = [], set()
    for conv in good:
        key = tuple((m.role, m.content) for m in conv)
        if key not in keys:
            keys.add(key)
            unique.append(conv)
    return ConversationSource(name, unique, problems[:MAX_PROBLEMS_SHOWN], len(problems), len(good) - len(unique))


def builtin_conversations() -> ConversationSource:
    """The English dialogues of chatterbot-corpus, each read as alternating user/assistant turns."""
    try:
        import yaml
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError:
        raise ValueError("the built-in conversations need the packages chatterbot-corpus and pyyaml; "
                         "run: python -m pip install -r requirements.txt") from None
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
    return _finish(BUILTIN_CONVERSATIONS_NAME, good, [], len(good))


def open_conversations(spec: str) -> ConversationSource:
    """A JSONL/JSON file or a folder of them typed by the user; empty means the built-in set."""
    spec = spec.strip().strip('"').strip("'")
    if not spec:
        return builtin_conversations()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CONVERSATION_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no .jsonl or .json files")
    else:
        files = [path]
    good: list[list[Message]] = []
    problems: list[str] = []
    seen = sum(_read_file(p, good, problems) for p in files)
    return _finish(str(path), good, problems, seen)


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
    """The last valid conversation in a JSONL/JSON file (to continue it)."""
    source = open_conversations(str(path))
    if source.skipped and not source.conversations:
        raise ValueError(source.problems[0])
    return source.conversations[-1]
