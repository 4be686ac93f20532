"""The forms conversation datasets come in, each read into our ``Message`` list.

Three forms cover most downloads:

- OpenAI ``messages``: ``{"messages": [{"role": "user", "content": "Hi"}, ...]}``, or the
  bare list of messages;
- ShareGPT: ``{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}``;
- Alpaca: ``{"instruction": "...", "input": "...", "output": "..."}``, one exchange: the
  instruction (and the input below it, when there is one) asks, the output answers.

A file holds one form: ``detect_form`` names it from its first record, and every record
of the file is read in that form, so a stray record of another form is reported as a
bad one rather than guessed at.

Real exports bend the turn order a little. Two messages in a row from the same side
are one turn (joined by a line break: several chat messages sent in a row), and a
conversation that the assistant opens loses that opening line, which answers nothing.
Both are counted (``Reading.merged``, ``Reading.dropped_openings``) so the user is told.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from engine.data.chat_format import Message, check_messages

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


class ConversationForm(Enum):
    OPENAI = "OpenAI messages"
    SHAREGPT = "ShareGPT"
    ALPACA = "Alpaca"


@dataclass
class Reading:
    """What reading records in one form adjusted along the way (summed over a file or folder)."""

    merged: int = 0  # messages joined to the one before them (same side twice in a row)
    dropped_openings: int = 0  # conversations whose assistant opening was left out

    def add(self, other: Reading) -> None:
        self.merged += other.merged
        self.dropped_openings += other.dropped_openings

    @property
    def notes(self) -> list[str]:
        notes = []
        if self.merged:
            notes.append(f"{self.merged} message(s) joined to the one before them (the same side spoke twice in "
                         "a row)")
        if self.dropped_openings:
            notes.append(f"{self.dropped_openings} conversation(s) opened with the assistant; that opening line "
                         "was left out")
        return notes


def detect_form(record: object) -> ConversationForm | None:
    """The form a decoded JSON record is in, or None when it is none of them."""
    if isinstance(record, list):
        return ConversationForm.OPENAI if all(isinstance(m, dict) and "role" in m for m in record) else None
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return ConversationForm.OPENAI
    if "conversations" in record:
        return ConversationForm.SHAREGPT
    if "instruction" in record and "output" in record:
        return ConversationForm.ALPACA
    return None


def read_record(record: object, form: ConversationForm, where: str, reading: Reading) -> list[Message]:
    """One conversation from a decoded record in ``form``; ValueError names ``where`` and the problem."""
    if form is ConversationForm.ALPACA:
        messages = _alpaca(record, where)
    else:
        messages = _openai(record, where) if form is ConversationForm.OPENAI else _sharegpt(record, where)
        messages = _regular_turns(messages, reading)
    try:
        check_messages(messages)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return messages


def _openai(record: object, where: str) -> list[Message]:
    if isinstance(record, dict):
        if "messages" not in record:
            raise ValueError(f"{where}: an object needs a \"messages\" list")
        record = record["messages"]
    if not isinstance(record, list):
        raise ValueError(f"{where}: expected a list of messages or {{\"messages\": [...]}}")
    messages = []
    for i, item in enumerate(record):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise ValueError(f"{where}: message {i + 1} needs \"role\" and \"content\"")
        if not isinstance(item["content"], str):
            raise ValueError(f"{where}: message {i + 1} content must be text")
        messages.append(Message(str(item["role"]), item["content"]))
    return messages


def _sharegpt(record: object, where: str) -> list[Message]:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise ValueError(f"{where}: a ShareGPT record needs a \"conversations\" list")
    messages = []
    for i, item in enumerate(turns):
        if not isinstance(item, dict) or "from" not in item or "value" not in item:
            raise ValueError(f"{where}: turn {i + 1} needs \"from\" and \"value\"")
        role = SHAREGPT_ROLES.get(str(item["from"]).strip().lower())
        if role is None:
            raise ValueError(f"{where}: turn {i + 1} is from {item['from']!r}; expected human or user, gpt, assistant, "
                             "chatgpt, bot or model, or system")
        if not isinstance(item["value"], str):
            raise ValueError(f"{where}: turn {i + 1} value must be text")
        messages.append(Message(role, item["value"]))
    return messages


def _alpaca(record: object, where: str) -> list[Message]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: an Alpaca record is an object with \"instruction\" and \"output\"")
    fields = {}
    for name in ("instruction", "input", "output", "system"):
        value = record.get(name) or ""
        if not isinstance(value, str):
            raise ValueError(f"{where}: \"{name}\" must be text")
        fields[name] = value.strip()
    if not fields["instruction"]:
        raise ValueError(f"{where}: the instruction is empty")
    if not fields["output"]:
        raise ValueError(f"{where}: the output is empty")
    question = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    system = [Message("system", fields["system"])] if fields["system"] else []
    return [*system, Message("user", question), Message("assistant", fields["output"])]


def _regular_turns(messages: list[Message], reading: Reading) -> list[Message]:
    """Join same-side messages in a row, and drop an assistant opening (see the module docstring).

    Empty messages are left for ``check_messages`` to name; roles it does not know too.
    """
    joined: list[Message] = []
    for m in messages:
        if joined and m.role == joined[-1].role and m.role != "system" and m.content.strip():
            joined[-1] = Message(m.role, f"{joined[-1].content}\n{m.content}")
            reading.merged += 1
        else:
            joined.append(m)
    first = 1 if joined and joined[0].role == "system" else 0
    if len(joined) > first and joined[first].role == "assistant" and len(joined) > first + 1:
        del joined[first]
        reading.dropped_openings += 1
    return joined
