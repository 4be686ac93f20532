"""The OpenAI API's wire format: request bodies in, response bodies and stream chunks out.

Only shapes live here: pydantic models that check a request's types, and functions
that build the JSON a response carries. What a request means (its generation
settings, which model) is the server's business. Field names are OpenAI's, with our
``top_k`` and ``repetition_penalty`` beside them. Types are strict: ``"5"`` is not a
number and ``1`` is not ``true``; an unknown field is refused rather than ignored,
so a setting this server does not honour never passes silently.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 200  # each one is searched for at every token


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationFields(_Strict):
    """The fields both endpoints share. None means "the server's default"."""

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None  # accepted and ignored: clients send it to label requests
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)):
            raise ValueError(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings, "
                             f"each at most {MAX_STOP_CHARS} characters")
        return tuple(stops)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("n must be 1: this server returns one choice per request")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float | None, info) -> float | None:
        if value not in (None, 0.0):
            raise ValueError(f"{info.field_name} is not supported (only 0); use repetition_penalty instead")
        return value


class CompletionRequest(GenerationFields):
    prompt: str = ""

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_text(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0]  # a batch of one prompt
        if not isinstance(value, str):
            raise ValueError("prompt must be a string (or a list holding one string); "
                             "token ids and batches of prompts are not supported")
        return value


class ChatMessage(_Strict):
    role: str
    content: str
    name: str | None = None  # accepted and ignored

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """Content may be a string or a list of {"type": "text", "text": ...} parts."""
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in value):
                raise ValueError("content must be a string or a list of text parts ({\"type\": \"text\", "
                                 "\"text\": ...}); this model reads text only")
            return "".join(p["text"] for p in value)
        if not isinstance(value, str):
            raise ValueError("content must be a string or a list of text parts")
        return value


class ChatRequest(GenerationFields):
    messages: list[ChatMessage]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The one error shape every failure is sent in."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation_errors(errors: Sequence[dict]) -> tuple[str, str | None]:
    """One line for the first problem pydantic (or FastAPI's body reader) found, and the field.

    >>> describe_validation_errors([{"type": "int_type", "loc": ("body", "max_tokens"),
    ...                              "msg": "Input should be a valid integer", "input": "5"}])
    ("max_tokens: Input should be a valid integer (got '5')", 'max_tokens')
    """
    first = errors[0]
    kind = first.get("type", "")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "it cannot be decoded")
        where = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return f"the body is not valid JSON: {reason}{where}", None
    if not loc:
        if kind == "missing":
            return "the request has no body: send a JSON object", None
        return "the body must be a JSON object", None
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    if kind == "extra_forbidden":
        return f"unknown field {path!r}: this server does not support it", path
    if kind == "missing":
        return f"missing field {path!r}", path
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "value_error":
        return message, path
    got = repr(first["input"])[:40] if "input" in first else ""
    return f"{path}: {message}" + (f" (got {got})" if got else ""), path


@dataclass
class ResponseShape:
    """Builds the bodies of one response: a text completion or a chat completion."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def _envelope(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              notices: list[str]) -> dict:
        """The body of a response that is not streamed."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._envelope(False), "choices": [choice], "usage": self.usage(prompt_tokens, completion_tokens)}
        if notices:
            body["notices"] = notices
        return body

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed event: a piece of text, or (with ``finish_reason``) the end."""
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last event when ``stream_options.include_usage`` is set: no choices, the usage."""
        return {**self._envelope(True), "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
