"""Talking to a model: Q&A, chat and completion over one token generator.

The three differ only in the prompt they build and the strings that end an answer;
all stream through ``ResponseGenerator.stream_ids``, which uses a preallocated KV cache
so each new token costs one position of compute.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.data.chat_format import ChatTokenIds, Message, chat_ids_in_force, check_messages, render
from engine.data.tokenizer import BaseTokenizer
from engine.folder.model_folder import ModelFolder
from engine.generation.sampling import REPETITION_WINDOW, GenerationConfig, sample_next_token
from engine.generation.streaming import TextStreamer, strip_leading_space
from engine.model.config import ModelConfig
from engine.model.decoder import Decoder
from engine.model.gpt import GPT
from engine.runtime import hardware

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationStats:
    """How the last generation went: what a server reports as usage and finish reason."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": end-of-text, end of turn or a stop string; "length": max_new_tokens


@dataclass(frozen=True)
class ModelInfo:
    """What the Model Information screen shows about the loaded model."""

    config: ModelConfig
    parameters: int
    tokenizer: str
    training_steps: int
    device: str

    @property
    def memory_mb(self) -> float:
        return self.parameters * 4 / 2**20  # fp32 weights


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


CHAT_STOPS = ("\nUser:", "\nAI:")
QA_STOPS = ("\nQuestion:", "\n\n")


def _version(t: torch.Tensor) -> int:
    """How many in-place updates ``t`` has had; -1 for inference tensors, which never change."""
    try:
        return t._version
    except RuntimeError:  # made under torch.inference_mode(): no version counter
        return -1


class ResponseGenerator:
    """A trained model loaded for inference, in eval mode."""

    def __init__(self, model_dir: str, runtime: hardware.Runtime | None = None) -> None:
        self.runtime = runtime or hardware.detect_runtime()
        self.folder = ModelFolder(model_dir)
        self.model, self.tokenizer, meta = self.folder.load_model(self.runtime.device)
        self.meta = meta.to_dict()  # config.json's JSON
        self.notices: list[str] = []  # what the last call had to adjust (e.g. truncation)
        self.finish_reason = "length"  # why the last generation ended
        self.last_stats: GenerationStats | None = None

    @classmethod
    def from_model(cls, model: GPT, tokenizer: BaseTokenizer,
                   runtime: hardware.Runtime | None = None) -> ResponseGenerator:
        """A generator for a model already in memory (no model folder), e.g. for bench.py."""
        self = cls.__new__(cls)
        self.runtime = runtime or hardware.detect_runtime()
        self.folder = None
        self.model = model.to(self.runtime.device).eval()
        self.tokenizer = tokenizer
        self.meta = {}
        self.notices = []
        self.finish_reason = "length"
        self.last_stats = None
        return self

    @property
    def context(self) -> int:
        return self.model.config.context

    def info(self) -> ModelInfo:
        return ModelInfo(config=self.model.config, parameters=self.model.num_params(),
                         tokenizer=self.tokenizer.kind, training_steps=self.meta.get("progress", {}).get("step", 0),
                         device=str(self.runtime.device))

    # -- the token loop --------------------------------------------------------------------
    def prompt_budget(self, max_new_tokens: int) -> int:
        """How many prompt tokens fit while leaving room to answer (at least half the window)."""
        return max(1, self.context - min(max_new_tokens, self.context // 2))

    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> list[int]:
        budget = self.prompt_budget(max_new_tokens)
        if len(ids) > budget:
            self.notices.append(f"the prompt has {len(ids)} tokens; only the last {budget} fit the "
                                f"{self.context}-token context, so the start was cut")
            ids = ids[-budget:]
        return ids or [self.tokenizer.eot_id]

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], cfg: GenerationConfig, use_cache: bool = True,
                     stop_ids: frozenset[int] = frozenset()) -> Iterator[int]:
        """Yield new ids until end-of-text, one of ``stop_ids`` or ``max_new_tokens``.

        The stopping id itself is never yielded; ``self.finish_reason`` says why it ended.

        ``use_cache=False`` recomputes the whole context every step, in the same
        compute precision: the slow, obviously-correct reference that the cached path
        is tested against (token for token when the weights are fp32 too).
        When the context fills up, the oldest tokens are cropped (learned positions
        cannot roll) and the cache is refilled from the kept half.
        """
        model, device = self.model, self.runtime.device
        rng = random.Random(cfg.seed)  # None: seeded from the OS
        self.finish_reason = "length"
        visible = list(prompt_ids)[-self.context:] or [self.tokenizer.eot_id]
        decoder = self._decoder() if use_cache else None
        cache = decoder.new_cache() if decoder is not None else None
        pending = visible  # ids the cache has not seen yet
        exempt = stop_ids | {self.tokenizer.eot_id}
        for _ in range(cfg.max_new_tokens):
            if len(visible) > self.context:  # the same rule for both paths
                visible = visible[-(self.context // 2):]
                if cache is not None:
                    cache.reset()
                    pending = visible
            if decoder is not None:
                logits = decoder.step(pending, cache)
            else:
                with self.runtime.generation_autocast():
                    logits, _ = model(torch.tensor([visible], device=device), last_only=True)
                logits = logits[0, -1].float()
            # The penalty never falls on the end of text or a stop id (a chat's <|end|> and
            # role tokens): the prompt is full of them, and a model that must not end its
            # turn because the last turn ended would talk on past it.
            recent = set(visible[-REPETITION_WINDOW:]) - exempt if cfg.repetition_penalty != 1.0 else set()
            next_id = sample_next_token(logits, rng, cfg.temperature, cfg.top_k, cfg.top_p,
                                        cfg.repetition_penalty, recent)
            if next_id == self.tokenizer.eot_id or next_id in stop_ids:
                self.finish_reason = "stop"
                return
            yield next_id
            visible.append(next_id)
            pending = [next_id]

    def _decoder(self) -> Decoder:
        """The model's Decoder, rebuilt only when a weight has changed since the last one."""
        key = tuple((p.data_ptr(), _version(p)) for p in self.model.parameters())
        if getattr(self, "_decoder_key", None) != key:
            self._decoder_obj = Decoder(self.model, self.runtime.decode_dtype, self.runtime.decode_weights)
            self._decoder_key = key
        return self._decoder_obj

    def stream(self, prompt: str, cfg: GenerationConfig, stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
        """Yield the completion of ``prompt`` as text pieces, as soon as they are safe to show."""
        self.notices = []
        ids = self.fit_prompt(self.tokenizer.encode(prompt), cfg.max_new_tokens)
        return self.stream_ids(ids, cfg, stop_strings)

    def stream_ids(self, prompt_ids: list[int], cfg: GenerationConfig, stop_strings: tuple[str, ...] = (),
                   stop_ids: frozenset[int] = frozenset()) -> Iterator[str]:
        """Yield the text that follows ``prompt_ids``; ``self.last_stats`` is set when it ends."""
        streamer = TextStreamer(self.tokenizer, stop_strings)
        produced = 0
        self.last_stats = None
        try:
            for token_id in self.generate_ids(prompt_ids, cfg, stop_ids=stop_ids):
                produced += 1
                piece = streamer.push(token_id)
                if piece:
                    yield piece
                if streamer.stopped:
                    self.finish_reason = "stop"
                    return
            tail = streamer.flush()
            if tail:
                yield tail
        finally:  # also when the caller stops early (Ctrl+C, a client that went away)
            self.last_stats = GenerationStats(len(prompt_ids), produced, self.finish_reason)

    # -- the three modes -----------------------------------------------------------------------
    def answer(self, question: str, cfg: GenerationConfig) -> Iterator[str]:
        """A single question. A chat-tuned model gets it as a one-turn conversation."""
        question = question.strip()
        if not question:
            raise ValueError("the question is empty; type a question")
        if self.chat_ids is not None:
            return self.chat([Message("user", question)], cfg)
        return strip_leading_space(self.stream(f"Question: {question}\nAnswer:", cfg, QA_STOPS))

    def complete(self, prompt: str, cfg: GenerationConfig, stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
        """Continue ``prompt``; an empty prompt samples freely from the start of a document."""
        return self.stream(prompt, cfg, stop_strings)

    @property
    def chat_ids(self) -> ChatTokenIds | None:
        """The chat tokens, when this model has been fine-tuned on conversations (else None)."""
        return chat_ids_in_force(self.meta, self.tokenizer)

    def chat(self, messages: list[Message], cfg: GenerationConfig,
             stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
        """Stream the assistant's reply to ``messages`` (which end with the user's turn).

        A chat-tuned model gets the learned format and stops at its end-of-turn token;
        any other model gets the plain 'User:/AI:' text and stops where a new line
        starts the next turn. ``stop_strings`` end the reply too (the server's ``stop``).
        When the conversation does not fit the context, the oldest turns are dropped
        (a system message is kept) and a notice says so.
        """
        check_messages(messages, need_reply=False)
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        self.notices = []
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
            self.notices.append(f"the {dropped // 2} oldest exchange(s) no longer fit the context and were left out")
        ids = self.fit_prompt(ids, cfg.max_new_tokens)
        if self.chat_ids is not None:
            # <|end|> closes the reply; a role token would start someone else's turn: never shown.
            ends = frozenset({self.chat_ids.end, self.chat_ids.user, self.chat_ids.system})
            return strip_leading_space(self.stream_ids(ids, cfg, stop_strings, ends))
        return strip_leading_space(self.stream_ids(ids, cfg, CHAT_STOPS + tuple(stop_strings)))


class ChatSession:
    """A conversation in the menu: an optional system message and the turns so far."""

    def __init__(self, generator: ResponseGenerator, cfg: GenerationConfig) -> None:
        self.generator = generator
        self.cfg = cfg
        self.system = ""
        self.messages: list[Message] = []  # user and assistant turns, alternating

    def reset(self) -> None:
        self.messages = []

    def conversation(self) -> list[Message]:
        """The whole conversation, system message first (what /save writes)."""
        return ([Message("system", self.system)] if self.system else []) + self.messages

    def load(self, messages: list[Message]) -> None:
        """Continue a saved conversation: its system message and turns replace these."""
        check_messages(messages, need_reply=False)
        self.system = messages[0].content if messages[0].role == "system" else ""
        self.messages = [m for m in messages if m.role != "system"]

    def send(self, message: str) -> Iterator[str]:
        message = message.strip()
        if not message:
            raise ValueError("the message is empty; type something, or /help")
        asked = Message("user", message)
        pieces: list[str] = []
        for piece in self.generator.chat(self.conversation() + [asked], self.cfg):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces).strip()
        # An empty reply cannot be sent back as a turn; keep the question unanswered out.
        if reply:
            self.messages += [asked, Message("assistant", reply)]
