"""From token ids to text on the screen: incremental UTF-8, stop strings held back."""
from __future__ import annotations

import codecs
from typing import Iterator

from engine.data.tokenizer import BaseTokenizer


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


class LeadingSpace:
    """Drops the whitespace a model emits right after 'Answer:' or 'AI:', piece by piece:
    ``strip(piece)`` returns what is left of it to show ('' while only whitespace came)."""

    def __init__(self) -> None:
        self.started = False

    def strip(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece


def strip_leading_space(pieces: Iterator[str]) -> Iterator[str]:
    """Drop the whitespace a model emits right after 'Answer:' or 'AI:'."""
    leading = LeadingSpace()
    for piece in pieces:
        piece = leading.strip(piece)
        if piece:
            yield piece
