"""From a request to the ids a generation starts from: completion, chat and Q&A prompts.

``PromptBuilder`` renders and fits a prompt into the context and says what it had to
adjust (``notices``); it returns a ``PreparedRequest``, everything one generation
needs: the ids, the settings, what ends the answer. ``ResponseGenerator`` (one answer
at a time, the menu and command line) and the server's batch scheduler (many at
once) both start from it, so the three modes are built in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.data.chat_format import ChatTokenIds, Message, check_messages, render
from engine.data.tokenizer import BaseTokenizer
from engine.generation.sampling import GenerationConfig

CHAT_STOPS = ("\nUser:", "\nAI:")
QA_STOPS = ("\nQuestion:", "\n\n")


def render_plain(messages: list[Message]) -> str:
    """The fallback chat prompt for a model that never learned the chat format.

    A system message becomes the first line; turns are 'User:' and 'AI:' lines, and
    the text ends with an open 'AI:' for the model to continue.

    >>> render_plain([Message("user", "hi"), Message("assistant", "hello"), Message("user", "how are you?")])
    'User: hi\\nAI: hello\\nUser: how are you?\\nAI:'
    """
    lines = []
    for m in messages:
        if m.role == "system":
            lines.append(m.content)
        else:
            lines.append(f"{'User' if m.role == 'user' else 'AI'}: {m.content}")
    return "\n".join(lines + ["AI:"])


@dataclass(frozen=True)
class PreparedRequest:
    """One generation, ready to run: the prompt's ids and what shapes the answer.

    ``stop_ids`` end it without being shown (a chat's end of turn and role tokens);
    ``stop_strings`` end it where its text reaches one. ``strip_leading_space`` drops
    the whitespace a model writes after 'Answer:' or 'AI:'. ``notices`` say what was
    adjusted to fit (a prompt cut, turns left out).
    """

    ids: list[int]
    cfg: GenerationConfig
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    strip_leading_space: bool = False
    notices: list[str] = field(default_factory=list)


class PromptBuilder:
    """Builds the prompts of one model: its tokenizer, its chat tokens (None: never
    chat-tuned) and its context."""

    def __init__(self, tokenizer: BaseTokenizer, chat_ids: ChatTokenIds | None, context: int) -> None:
        self.tokenizer = tokenizer
        self.chat_ids = chat_ids
        self.context = context

    def prompt_budget(self, max_new_tokens: int) -> int:
        """How many prompt tokens fit while leaving room to answer (at least half the window)."""
        return max(1, self.context - min(max_new_tokens, self.context // 2))

    def fit(self, ids: list[int], max_new_tokens: int, notices: list[str]) -> list[int]:
        """The last ``prompt_budget`` ids (a notice says so when the start is cut); never empty."""
        budget = self.prompt_budget(max_new_tokens)
        if len(ids) > budget:
            notices.append(f"the prompt has {len(ids)} tokens; only the last {budget} fit the "
                           f"{self.context}-token context, so the start was cut")
            ids = ids[-budget:]
        return ids or [self.tokenizer.eot_id]

    def complete(self, prompt: str, cfg: GenerationConfig, stop_strings: tuple[str, ...] = ()) -> PreparedRequest:
        """Continue ``prompt``; an empty prompt samples freely from the start of a document."""
        notices: list[str] = []
        ids = self.fit(self.tokenizer.encode(prompt), cfg.max_new_tokens, notices)
        return PreparedRequest(ids, cfg, tuple(stop_strings), notices=notices)

    def answer(self, question: str, cfg: GenerationConfig) -> PreparedRequest:
        """A single question. A chat-tuned model gets it as a one-turn conversation."""
        question = question.strip()
        if not question:
            raise ValueError("the question is empty; type a question")
        if self.chat_ids is not None:
            return self.chat([Message("user", question)], cfg)
        request = self.complete(f"Question: {question}\nAnswer:", cfg, QA_STOPS)
        return PreparedRequest(request.ids, cfg, QA_STOPS, strip_leading_space=True, notices=request.notices)

    def chat(self, messages: list[Message], cfg: GenerationConfig,
             stop_strings: tuple[str, ...] = ()) -> PreparedRequest:
        """The assistant's reply to ``messages`` (which end with the user's turn).

        A chat-tuned model gets the learned format and stops at its end-of-turn token;
        any other model gets the plain 'User:/AI:' text and stops where a new line
        starts the next turn. ``stop_strings`` end the reply too (the server's ``stop``).
        When the conversation does not fit the context, the oldest turns are dropped
        (a system message is kept) and a notice says so.
        """
        check_messages(messages, need_reply=False)
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        notices: list[str] = []
        system = [m for m in messages[:1] if m.role == "system"]
        turns = messages[len(system):]
        budget = self.prompt_budget(cfg.max_new_tokens)
        dropped = 0
        while True:
            kept = system + turns[dropped:]
            if self.chat_ids is not None:
                ids, _ = render(self.tokenizer, self.chat_ids, kept, open_reply=True)
            else:
                ids = self.tokenizer.encode(render_plain(kept))
            if len(ids) <= budget or len(turns) - dropped <= 1:
                break
            dropped += 2  # a user turn and the reply to it
        if dropped:
            notices.append(f"the {dropped // 2} oldest exchange(s) no longer fit the context and were left out")
        ids = self.fit(ids, cfg.max_new_tokens, notices)
        if self.chat_ids is not None:
            # <|end|> closes the reply; a role token would start someone else's turn: never shown.
            ends = frozenset({self.chat_ids.end, self.chat_ids.user, self.chat_ids.system})
            return PreparedRequest(ids, cfg, tuple(stop_strings), ends, True, notices)
        return PreparedRequest(ids, cfg, CHAT_STOPS + tuple(stop_strings), strip_leading_space=True, notices=notices)
