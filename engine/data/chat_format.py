"""The one chat format: how a conversation becomes token ids, and which ids are learned.

A conversation is rendered as reserved special tokens around each message's text::

    <|endoftext|><|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

The leading end-of-text marks the start of a new document, as in pretraining. Each
message's content is encoded on its own and its ids are placed between the role
token and ``<|end|>``, so nothing a user types can ever become a special token:
typing "<|user|>" yields the ids of those characters. Chat, training on
conversations and the exported chat template all go through this module, so their
formats cannot drift apart.

Fine-tuning learns only the assistant's replies: ``render`` marks as targets exactly
the ids of each assistant message and the ``<|end|>`` that closes it. System and user
ids, and the role tokens, are context.
"""
from __future__ import annotations

from dataclasses import dataclass

SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": SYSTEM_TOKEN, "user": USER_TOKEN, "assistant": ASSISTANT_TOKEN}


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ChatTokenIds:
    """The ids of the reserved chat tokens in one tokenizer."""

    system: int
    user: int
    assistant: int
    end: int

    def for_role(self, role: str) -> int:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]


def check_messages(messages: list[Message], need_reply: bool = True) -> None:
    """Raise ValueError naming the first problem: unknown role, empty content, order.

    The order is an optional system message, then user and assistant alternating,
    starting with the user. ``need_reply``: at least one assistant message (training
    data); a prompt being sent may end with the user.
    """
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"message {i + 1} has the unknown role {m.role!r} (use system, user or assistant)")
        if not isinstance(m.content, str) or not m.content.strip():
            raise ValueError(f"message {i + 1} ({m.role}) has empty content")
    turns = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            where = i + 1 + (len(messages) - len(turns))
            raise ValueError(f"roles do not alternate: message {where} is {m.role}, expected {expected} "
                             "(an optional system message first, then user and assistant in turn)")
    if need_reply and not any(m.role == "assistant" for m in turns):
        raise ValueError("the conversation has no assistant reply to learn from")


def render(tok, chat_ids: ChatTokenIds, messages: list[Message],
           open_reply: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, and for each id whether it is a training target.

    ``open_reply`` ends the ids with the assistant token, ready for the model to
    answer (a chat prompt); the targets are then all False.

    >>> # ids: [eot, system, ...'Be brief', end, user, ...'Hi', end, assistant, ...'Hello', end]
    >>> # target: True only for ...'Hello' and the end that closes it
    """
    ids, target = [tok.eot_id], [False]
    for m in messages:
        content = tok.encode(m.content)
        learned = m.role == "assistant" and not open_reply
        ids += [chat_ids.for_role(m.role), *content, chat_ids.end]
        target += [False] + [learned] * (len(content) + 1)
    if open_reply:
        ids.append(chat_ids.assistant)
        target.append(False)
    return ids, target


def render_text(messages: list[Message], open_reply: bool = False, eot_token: str = "<|endoftext|>") -> str:
    """The same rendering as text (for export templates and for reading); never encode it."""
    text = eot_token + "".join(f"{ROLE_TOKENS[m.role]}{m.content}{END_TOKEN}" for m in messages)
    return text + (ASSISTANT_TOKEN if open_reply else "")


def parse(tok, chat_ids: ChatTokenIds, ids: list[int]) -> list[Message]:
    """Messages back from rendered ids: the inverse of ``render`` (a leading end-of-text is skipped)."""
    roles = {chat_ids.system: "system", chat_ids.user: "user", chat_ids.assistant: "assistant"}
    messages, role, content = [], None, []
    for i in ids:
        if i in roles and role is None:
            role, content = roles[i], []
        elif i == chat_ids.end and role is not None:
            messages.append(Message(role, tok.decode(content)))
            role = None
        elif role is not None:
            content.append(i)
        elif i != tok.eot_id:
            raise ValueError(f"id {i} stands outside any message")
    if role is not None:
        raise ValueError("the last message has no end")
    return messages


def chat_ids_in_force(chat_tuned: bool, tok) -> ChatTokenIds | None:
    """The chat tokens when the model has a chat format, else None.

    A model has one once it is fine-tuned on conversations (``chat_tuned`` in its
    config.json) and its tokenizer holds the chat tokens; a model that never learned
    them gets the plain 'User:/AI:' prompt instead.
    """
    if not chat_tuned:
        return None
    return tok.chat_token_ids()


def jinja_chat_template(eot_token: str = "<|endoftext|>") -> str:
    """``render_text`` as a Jinja chat template (Hugging Face ``apply_chat_template``, GGUF).

    With ``add_generation_prompt`` it renders ``render_text(messages, open_reply=True)``.
    A role other than system, user or assistant raises, as ``check_messages`` does.
    """
    roles = ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items())
    return ("{%- set role_tokens = {" + roles + "} -%}"
            "{{- '" + eot_token + "' -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in role_tokens -%}"
            "{{- raise_exception('unknown role ' + message['role'] + ' (use system, user or assistant)') -}}"
            "{%- endif -%}"
            "{{- role_tokens[message['role']] + message['content'] + '" + END_TOKEN + "' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_TOKEN + "' -}}{%- endif -%}")
