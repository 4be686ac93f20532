"""Talking to a model: Q&A, chat and completion, one answer at a time.

The three differ only in the prompt they build and what ends an answer
(``engine.generation.prompts``); all stream through one ``Reply`` (``token_loop``)
over a preallocated KV cache, so each new token costs one position of compute. The
server runs many such replies at once (``engine.serving.batching``) from the same
prompts and the same token loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.data.chat_format import ChatTokenIds, Message, chat_ids_in_force, check_messages
from engine.data.tokenizer import BaseTokenizer
from engine.folder.model_folder import ModelFolder
from engine.generation.prompts import CHAT_STOPS, QA_STOPS, PreparedRequest, PromptBuilder, render_plain
from engine.generation.sampling import GenerationConfig
from engine.generation.token_loop import FinishReason, GenerationStats, Reply, TokenLoop
from engine.model.config import ModelConfig
from engine.model.decoder import Decoder, KVCache
from engine.model.gpt import GPT
from engine.runtime import hardware

__all__ = ["CHAT_STOPS", "QA_STOPS", "ChatSession", "GenerationStats", "ModelInfo", "ResponseGenerator",
           "render_plain"]

log = logging.getLogger(__name__)


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


def _version(t: torch.Tensor) -> int:
    """How many in-place updates ``t`` has had; -1 for inference tensors, which never change."""
    try:
        return t._version
    except RuntimeError:  # made under torch.inference_mode(): no version counter
        return -1


class ResponseGenerator:
    """A trained model loaded for inference, in eval mode."""

    def __init__(self, model_dir: str, runtime: hardware.Runtime | None = None) -> None:
        runtime = runtime or hardware.detect_runtime()
        folder = ModelFolder(model_dir)
        model, tokenizer, meta = folder.load_model(runtime.device)
        self._hold(model, tokenizer, runtime, folder, chat_tuned=meta.chat_tuned, training_steps=meta.progress.step)

    @classmethod
    def from_model(cls, model: GPT, tokenizer: BaseTokenizer,
                   runtime: hardware.Runtime | None = None) -> ResponseGenerator:
        """A generator for a model already in memory (no model folder), e.g. for bench.py."""
        self = cls.__new__(cls)
        self._hold(model, tokenizer, runtime or hardware.detect_runtime(), None, chat_tuned=False, training_steps=0)
        return self

    def _hold(self, model: GPT, tokenizer: BaseTokenizer, runtime: hardware.Runtime, folder: ModelFolder | None,
              chat_tuned: bool, training_steps: int) -> None:
        self.runtime, self.folder, self.tokenizer = runtime, folder, tokenizer
        self.model = model.to(runtime.device).eval()
        self.chat_tuned, self.training_steps = chat_tuned, training_steps
        self.notices: list[str] = []  # what the last call had to adjust (e.g. truncation)
        self.finish_reason = FinishReason.LENGTH  # why the last generation ended
        self.last_stats: GenerationStats | None = None
        self._spare_cache: tuple[Decoder, KVCache] | None = None  # the last reply's, for the next

    @property
    def context(self) -> int:
        return self.model.config.context

    def info(self) -> ModelInfo:
        return ModelInfo(config=self.model.config, parameters=self.model.num_params(),
                         tokenizer=self.tokenizer.kind, training_steps=self.training_steps,
                         device=str(self.runtime.device))

    # -- the token loop --------------------------------------------------------------------
    @property
    def prompts(self) -> PromptBuilder:
        """How this model's prompts are built (``engine.generation.prompts``)."""
        return PromptBuilder(self.tokenizer, self.chat_ids, self.context)

    def prompt_budget(self, max_new_tokens: int) -> int:
        """How many prompt tokens fit while leaving room to answer (at least half the window)."""
        return self.prompts.prompt_budget(max_new_tokens)

    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return self.prompts.fit(ids, max_new_tokens, self.notices)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], cfg: GenerationConfig, use_cache: bool = True,
                     stop_ids: frozenset[int] = frozenset()) -> Iterator[int]:
        """Yield new ids until end-of-text, one of ``stop_ids`` or ``max_new_tokens``.

        The stopping id itself is never yielded; ``self.finish_reason`` says why it ended.

        ``use_cache=False`` recomputes the whole context every step, in the same
        compute precision: the slow, obviously-correct reference that the cached path
        is tested against (token for token when the weights are fp32 too).
        When the context fills up, the oldest tokens are cropped (learned positions
        cannot roll) and the cache is refilled from the kept half (``TokenLoop``).
        """
        self.finish_reason = FinishReason.LENGTH
        decoder = self._decoder() if use_cache else None
        cache = self._borrow_cache(decoder) if decoder is not None else None
        loop = TokenLoop(prompt_ids, cfg, self.context, self.tokenizer.eot_id, stop_ids, cache)
        try:
            while not loop.done:
                if decoder is not None:
                    logits = decoder.step(loop.next_ids(), loop.cache)
                    if not loop.ready:  # more of the prompt to feed first
                        continue
                else:
                    with self.runtime.generation_autocast():
                        logits, _ = self.model(torch.tensor([loop.visible], device=self.runtime.device),
                                               last_only=True)
                    logits = logits[0, -1].float()
                next_id = loop.choose(logits)
                if next_id is None:
                    break
                yield next_id
        finally:
            self._return_cache(decoder, cache)
        self.finish_reason = loop.finish_reason or "length"

    def _decoder(self) -> Decoder:
        """The model's Decoder, rebuilt only when a weight has changed since the last one."""
        key = tuple((p.data_ptr(), _version(p)) for p in self.model.parameters())
        if getattr(self, "_decoder_key", None) != key:
            self._decoder_obj = Decoder(self.model, self.runtime.decode_dtype, self.runtime.decode_weights)
            self._decoder_key = key
        return self._decoder_obj

    def _borrow_cache(self, decoder: Decoder) -> KVCache:
        """A KV cache for ``decoder``: the last reply's, reset, when it was ``decoder``'s and
        that reply has ended (its views, ``KVCache.at``, are made already), else a new one."""
        spare, self._spare_cache = self._spare_cache, None
        if spare is not None and spare[0] is decoder:
            spare[1].reset()
            return spare[1]
        return decoder.new_cache()

    def _return_cache(self, decoder: Decoder, cache: KVCache | None) -> None:
        """Keep ``cache`` for the next reply (one is enough: a generator's replies run one at a time)."""
        if cache is not None:
            self._spare_cache = (decoder, cache)

    def decoder(self) -> Decoder:
        """The Decoder generation runs on (the server's batch scheduler takes it from here)."""
        return self._decoder()

    def stream(self, prompt: str, cfg: GenerationConfig, stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
        """Yield the completion of ``prompt`` as text pieces, as soon as they are safe to show."""
        return self.run(self.prompts.complete(prompt, cfg, stop_strings))

    def run(self, request: PreparedRequest) -> Iterator[str]:
        """Yield the answer ``request`` describes; its notices become ``self.notices``."""
        self.notices = list(request.notices)
        return self._pieces(request)

    def _pieces(self, request: PreparedRequest) -> Iterator[str]:
        self.last_stats = None
        self.finish_reason = FinishReason.LENGTH
        decoder = self._decoder()
        reply = Reply(request, self.tokenizer, self.context, self._borrow_cache(decoder))
        try:
            while not reply.done:
                feed = reply.feed()
                piece = reply.take(decoder.step(feed.ids, feed.cache))
                if piece:
                    yield piece
        finally:  # also when the caller stops early (Ctrl+C, a client that went away)
            self.finish_reason = reply.finish_reason or FinishReason.LENGTH
            self.last_stats = reply.stats
            self._return_cache(decoder, reply.loop.cache)

    # -- the three modes -----------------------------------------------------------------------
    def answer(self, question: str, cfg: GenerationConfig) -> Iterator[str]:
        """A single question. A chat-tuned model gets it as a one-turn conversation."""
        return self.run(self.prompts.answer(question, cfg))

    def complete(self, prompt: str, cfg: GenerationConfig, stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
        """Continue ``prompt``; an empty prompt samples freely from the start of a document."""
        return self.stream(prompt, cfg, stop_strings)

    @property
    def chat_ids(self) -> ChatTokenIds | None:
        """The chat tokens, when this model has been fine-tuned on conversations (else None)."""
        return chat_ids_in_force(self.chat_tuned, self.tokenizer)

    def chat(self, messages: list[Message], cfg: GenerationConfig,
             stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
        """Stream the assistant's reply to ``messages`` (which end with the user's turn).

        The prompt is ``PromptBuilder.chat``'s: the learned format for a chat-tuned
        model, else the plain 'User:/AI:' text; oldest turns dropped to fit, with a notice.
        """
        return self.run(self.prompts.chat(messages, cfg, stop_strings))


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
