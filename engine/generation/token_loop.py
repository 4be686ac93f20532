"""One generation, a step at a time: the ids to run next, a token from each step's logits, its text.

``TokenLoop`` is the token rule every generation follows: the prompt is fed in chunks
of at most ``PREFILL_CHUNK`` ids, each new id is drawn by ``sample_next_token`` with
the loop's own seeded ``random.Random``, the repetition penalty spares the ids that
end a turn, and a full context is cropped to its last half and fed again (learned
positions cannot roll). ``Reply`` adds the text: a ``TextStreamer`` (whole characters,
stop strings held back) and the leading space a chat reply drops.

Neither runs the model: whoever drives them runs one ``Decoder`` pass per step, for
one reply (``ResponseGenerator``, the menu) or many at once (the server's batch
scheduler). So a reply's tokens depend only on its own request and the logits of its
own rows, which ``Decoder.step_many`` makes batch-invariant (see decoder.py), and the
chunk boundaries of its prompt depend only on the prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

import torch

from engine.data.tokenizer import BaseTokenizer
from engine.generation.prompts import PreparedRequest
from engine.generation.sampling import (
    REPETITION_WINDOW,
    GenerationConfig,
    candidate_count,
    sample_next_token,
    top_candidates,
)
from engine.generation.streaming import LeadingSpace, TextStreamer
from engine.model.decoder import Feed, KVCache

# Prompt ids per step. The server runs a long prompt in chunks of this size between the
# steps of the replies already streaming, so none waits long for it (engine/serving/
# batching.py); the menu feeds its prompts in the same chunks, so that a reply's
# numbers are the same there as on the server.
PREFILL_CHUNK = 64


class FinishReason(str, Enum):
    """Why a reply's text ended; the values are the OpenAI API's ``finish_reason``."""

    STOP = "stop"  # end of text, end of turn, or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # whoever drove the reply stopped it (the server: its client left)


@dataclass(frozen=True)
class GenerationStats:
    """How a generation went: what a server reports as usage and finish reason."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


class TokenLoop:
    """The ids of one generation: feed ``next_ids()`` to the model until ``ready``, then
    ``choose(logits)``; ``done`` once it has ended (``finish_reason`` says why).

    ``cache`` is the sequence's KV cache (None for a caller that recomputes everything:
    the uncached reference); it is reset here when the context is cropped.
    """

    def __init__(self, prompt_ids: list[int], cfg: GenerationConfig, context: int, eot_id: int,
                 stop_ids: frozenset[int] = frozenset(), cache: KVCache | None = None,
                 chunk: int = PREFILL_CHUNK) -> None:
        self.cfg = cfg
        self.context = context
        self.eot_id = eot_id
        self.stop_ids = stop_ids
        # The penalty never falls on the end of text or a stop id (a chat's <|end|> and
        # role tokens): the prompt is full of them, and a model that must not end its
        # turn because the last turn ended would talk on past it.
        self.exempt = stop_ids | {eot_id}
        self.cache = cache
        self.chunk = chunk
        self.rng = random.Random(cfg.seed)  # None: seeded from the OS
        self.visible = list(prompt_ids)[-context:] or [eot_id]  # what the model sees
        self.pending = list(self.visible)  # the ids the cache has not seen yet
        self.produced = 0
        self.finish_reason: FinishReason | None = None  # set once done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ready(self) -> bool:
        """Whether the last ids fed were the last pending: that step's logits pick the next id."""
        return not self.pending

    def next_ids(self) -> list[int]:
        """The ids to run now: the first ``chunk`` of those the cache has not seen."""
        ids, self.pending = self.pending[:self.chunk], self.pending[self.chunk:]
        return ids

    def candidates(self, vocab: int) -> int | None:
        """How many top logits ``choose`` will look at (``candidate_count``); None when it is greedy."""
        cfg = self.cfg
        return None if cfg.temperature < 1e-4 else candidate_count(vocab, cfg.top_k, cfg.repetition_penalty)

    def choose(self, logits: torch.Tensor, top: tuple[list[float], list[int]] | None = None) -> int | None:
        """The next id, drawn from the logits (vocab,) after everything visible; None when the
        generation ends instead (end of text or a stop id, never returned). ``top``: the
        ``candidates`` largest logits and their ids, when a batch took them already."""
        cfg = self.cfg
        recent = set(self.visible[-REPETITION_WINDOW:]) - self.exempt if cfg.repetition_penalty != 1.0 else set()
        next_id = sample_next_token(logits, self.rng, cfg.temperature, cfg.top_k, cfg.top_p,
                                    cfg.repetition_penalty, recent, top)
        if next_id == self.eot_id or next_id in self.stop_ids:
            self.finish_reason = FinishReason.STOP
            return None
        self.produced += 1
        self.visible.append(next_id)
        self.pending = [next_id]
        if self.produced >= cfg.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
        elif len(self.visible) > self.context:  # crop, and feed the kept half again
            self.visible = self.visible[-(self.context // 2):]
            self.pending = list(self.visible)
            if self.cache is not None:
                self.cache.reset()
        return next_id


class Reply:
    """One answer in progress, a step at a time: a ``TokenLoop`` and the text its ids make.

    Each step, ``feed()`` is what this reply runs through the Decoder and ``take(logits)``
    the text that step adds ('' while nothing is safe to show, or while the prompt is
    still being fed). ``done`` once it has ended; ``stats`` at any time.
    """

    def __init__(self, request: PreparedRequest, tokenizer: BaseTokenizer, context: int, cache: KVCache,
                 chunk: int = PREFILL_CHUNK) -> None:
        self.request = request
        self.loop = TokenLoop(request.ids, request.cfg, context, tokenizer.eot_id, request.stop_ids, cache, chunk)
        self.streamer = TextStreamer(tokenizer, request.stop_strings)
        self.leading = LeadingSpace() if request.strip_leading_space else None
        self.finish_reason: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Whether the next feed is several ids (the prompt, or the kept half after a crop)."""
        return len(self.loop.pending) > 1

    def feed(self) -> Feed:
        return Feed(self.loop.next_ids(), self.loop.cache)

    def take(self, logits: torch.Tensor, top: tuple[list[float], list[int]] | None = None) -> str:
        """The text the step that ran ``feed()`` adds, given that feed's logits (vocab,)
        (and ``top``, its candidates, when ``take_all`` took them for many at once)."""
        if not self.loop.ready:
            return ""
        token_id = self.loop.choose(logits, top)
        text = ""
        if token_id is not None:
            text = self.streamer.push(token_id)
            if self.streamer.stopped:
                self.finish_reason = FinishReason.STOP
        if self.loop.done and not self.done:
            self.finish_reason = self.loop.finish_reason
            text += self.streamer.flush()  # a held-back tail that was no stop string after all
        return self.leading.strip(text) if self.leading is not None and text else text

    @property
    def stats(self) -> GenerationStats:
        """Usage so far; an unfinished reply (stopped by its caller) counts as "length"."""
        return GenerationStats(len(self.request.ids), self.loop.produced, self.finish_reason or "length")


def take_all(replies: list[Reply], logits: torch.Tensor) -> list[str]:
    """``reply.take(logits[i])`` for each reply of a step, with one ``top_candidates`` call
    for all the rows that sample with the same candidate count, instead of one each
    (each such call costs ~10 us at batch 1). A row's candidates are the ones it would
    take alone, ties included, so each reply draws what it would draw alone."""
    groups: dict[int, list[int]] = {}
    for i, reply in enumerate(replies):
        count = reply.loop.candidates(logits.shape[-1]) if reply.loop.ready else None
        if count is not None:
            groups.setdefault(count, []).append(i)
    tops: list[tuple[list[float], list[int]] | None] = [None] * len(replies)
    for count, rows in groups.items():
        values, ids = top_candidates(logits if len(rows) == len(replies) else logits[rows], count)
        for i, row_values, row_ids in zip(rows, values.tolist(), ids.tolist()):
            tops[i] = (row_values, row_ids)
    return [reply.take(logits[i], tops[i]) for i, reply in enumerate(replies)]
