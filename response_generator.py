"""Text generation: sampling, streaming, and the three ways to talk to a model.

Q&A, chat and completion differ only in the prompt they build and the strings that
end an answer; all three stream through the same token generator, which uses a
preallocated KV cache so each new token costs one position of compute.
"""
from __future__ import annotations

import bisect
import codecs
import itertools
import logging
import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch

from engine import hardware
from engine.chat_format import ChatTokenIds, Message, chat_ids_in_force, check_messages, render
from engine.model_folder import ModelFolder
from engine.tokenizer import BaseTokenizer
from model import GPT, Decoder, ModelConfig

log = logging.getLogger(__name__)

REPETITION_WINDOW = 64  # how many recent tokens the repetition penalty looks at


@dataclass
class GenerationConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    repetition_penalty: float = 1.1  # 1.0 disables
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 100_000:
            problems.append("max_new_tokens must be a whole number from 1 to 100000")
        if not 0.0 <= self.temperature <= 5.0:
            problems.append("temperature must be between 0 and 5")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append("top_k must be 0 (off) or a positive whole number")
        if not 0.0 < self.top_p <= 1.0:
            problems.append("top_p must be in (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 10.0:
            problems.append("repetition_penalty must be between 1 and 10")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return cls(**d)


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


def penalised(value: float, penalty: float) -> float:
    """The repetition penalty on one logit: positive ones divided, negative ones multiplied."""
    return value / penalty if value > 0 else value * penalty


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make recently used tokens less likely, over the whole vocabulary (a new tensor)."""
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[recent]
    logits[recent] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def best_candidates(logits: torch.Tensor, k: int, penalty: float = 1.0,
                    recent: frozenset[int] | set[int] = frozenset()) -> tuple[list[float], list[int]]:
    """The ``k`` largest logits after the repetition penalty, largest first, as lists.

    The penalty only ever lowers a logit, so the k best after it are among the
    k + len(recent) best before it: at most len(recent) of those can drop out, and
    every id beyond them was already below k unpenalised ones. So only that many
    are taken from the vocabulary (``topk``), and the penalty and the re-sort run in
    Python on those few, never as tensor passes over the whole vocabulary: at batch
    size 1 each such pass costs more than the arithmetic (this runs every token).
    """
    vocab = logits.numel()
    take = min(vocab, k + (len(recent) if penalty != 1.0 else 0))
    if take < vocab:
        values, ids = torch.topk(logits, take)  # sorted, largest first
    else:
        values, ids = torch.sort(logits, descending=True)
    values, ids = values.tolist(), ids.tolist()
    if penalty != 1.0 and recent:
        values = [penalised(v, penalty) if i in recent else v for v, i in zip(values, ids)]
        order = sorted(range(len(ids)), key=values.__getitem__, reverse=True)
        values, ids = [values[j] for j in order], [ids[j] for j in order]
    return values[:k], ids[:k]


def sample_next_token(logits: torch.Tensor, rng: random.Random, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0,
                      recent: frozenset[int] | set[int] = frozenset()) -> int:
    """Pick the next id from 1-D fp32 ``logits``. Temperature 0 (or near it) is greedy.

    ``recent`` ids get the repetition ``penalty`` first (see ``best_candidates``).
    With top-k set, only the k best logits are sorted, never the whole vocabulary;
    temperature keeps their order, so it is applied to those k alone. Top-p keeps the
    smallest prefix whose mass reaches p. The softmax and the draw are plain Python
    over the k values: each tensor operation costs several microseconds at this size.
    """
    if temperature < 1e-4:  # dividing by a near-zero temperature overflows: it is greedy anyway
        if penalty == 1.0 or not recent:
            return int(torch.argmax(logits))
        return best_candidates(logits, 1, penalty, recent)[1][0]
    vocab = logits.numel()
    values, ids = best_candidates(logits, top_k if top_k and top_k < vocab else vocab, penalty, recent)
    top = values[0]
    weights = [math.exp((v - top) / temperature) for v in values]
    cumulative = list(itertools.accumulate(weights))
    kept = len(weights)
    if top_p < 1.0:
        # Token i stays while the mass before it, cumulative[i - 1], is below p of the whole.
        kept = min(kept, 1 + bisect.bisect_left(cumulative, top_p * cumulative[-1]))
    # The first token whose cumulative mass exceeds u: never one of weight 0,
    # since the token before it has the same cumulative mass.
    u = rng.random() * cumulative[kept - 1]
    return ids[min(bisect.bisect_right(cumulative, u, 0, kept), kept - 1)]


class TextStreamer:
    """Turns a stream of ids into a stream of text, safely.

    Each id's bytes (``tokenizer.token_byte_strings()``) go through one incremental
    UTF-8 decoder. A character whose bytes are still arriving is held back until its
    last byte comes. Bytes that can never form a character are dropped: a model can
    sample byte pieces that are not UTF-8 (a lone continuation byte, a lead byte
    followed by a word), and the screen must not fill with U+FFFD it never meant. A
    U+FFFD the model did write, as its own bytes EF BF BD, is shown.

    Text that could be the start of a stop string is held back too, so a stop string
    never leaks to the screen. Only that held tail, shorter than the longest stop
    string, is looked at again, so each token costs the same however long the answer.
    """

    def __init__(self, tokenizer: BaseTokenizer, stop_strings: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._bytes = tokenizer.token_byte_strings()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.held = ""  # decoded text not shown yet: it could be the start of a stop string
        self.n_ids = 0  # ids pushed so far
        self.start = 0  # the text of every id before this one has been handed out
        self.stopped = False

    def _held_back(self, text: str) -> int:
        hold = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self.n_ids += 1
        text = self.held + self._utf8.decode(self._bytes[token_id])
        found = [at for stop in self.stop_strings if (at := text.find(stop)) != -1]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        shown = len(text) - self._held_back(text)
        self.held = text[shown:]
        if not self.held and not self._utf8.getstate()[0]:  # no partial character either
            self.start = self.n_ids
        return text[:shown]

    def flush(self) -> str:
        """Whatever is left once generation ends (a held-back prefix was not a stop).

        An unfinished character at the very end can no longer complete: it is dropped.
        """
        if self.stopped:
            return ""
        out = self.held + self._utf8.decode(b"", final=True)
        self.held = ""
        self.start = self.n_ids
        return out


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


def strip_leading_space(pieces: Iterator[str]) -> Iterator[str]:
    """Drop the whitespace a model emits right after 'Answer:' or 'AI:'."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        yield piece


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
        self.model, self.tokenizer, self.meta = self.folder.load_model(self.runtime.device)
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
