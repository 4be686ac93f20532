"""Two interchangeable tokenizers behind one small interface.

* ``BPETokenizer``: byte-level BPE trained with Hugging Face ``tokenizers``. Every
  string maps to bytes first, so no text is ever unknown. Saved as ``tokenizer.json``.
* ``SentencePieceTokenizer``: a unigram model trained with ``sentencepiece`` with
  ``byte_fallback`` on (characters outside the vocabulary become byte pieces) and the
  identity normalizer, so ``decode(encode(text)) == text`` for any text. Saved as
  ``tokenizer.model``.

Both put the shared special tokens first: id 0 is end-of-text, id 1 is padding; a new
tokenizer also reserves the chat tokens (``engine.data.chat_format.CHAT_TOKENS``), and an
older one gets them appended when its model is first fine-tuned on conversations.
Special tokens are never produced from user text (typing "<|endoftext|>" encodes as
ordinary characters), so data cannot inject control tokens.
"""
from __future__ import annotations

import hashlib
import io
import re
from typing import Iterable, Iterator

import numpy as np

from engine.data.chat_format import CHAT_TOKENS, ChatTokenIds
from engine.runtime.hardware import usable_cpu_cores

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOT_ID, PAD_ID = 0, 1
KINDS = ("bpe", "sentencepiece")
# Below this the BPE alphabet (256 bytes + specials) alone would not fit.
MIN_VOCAB = 300


def byte_to_unicode() -> dict[int, str]:
    """The printable stand-in character for each byte that byte-level BPE uses.

    Bytes that are visible Latin-1 characters stand for themselves; the others
    (controls, space, ...) are shifted to code points from 256 up, so every token
    is a printable string. Example: byte 32 (space) is shown as 'Ġ'.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, shift = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def without_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (not a character; SentencePiece refuses it) as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class BaseTokenizer:
    kind = ""
    filename = ""

    eot_id = EOT_ID
    pad_id = PAD_ID

    # -- interface every tokenizer implements --------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def _byte_strings(self) -> list[bytes]:
        """The bytes of each id, built from the vocabulary (see ``token_byte_strings``)."""
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------
    def token_byte_strings(self) -> tuple[bytes, ...]:
        """The UTF-8 bytes each id stands for, indexed by id; b"" for special and control tokens.

        Decoding ids is joining their bytes and reading them as UTF-8, so a streamer
        can decode one token at a time and decide itself what to do with bytes that do
        not form a character (a byte piece can hold half of one). Built once per tokenizer.
        """
        table = self.__dict__.get("_byte_table")
        if table is None:
            table = self.__dict__["_byte_table"] = tuple(self._byte_strings())
        return table

    def token_bytes(self) -> np.ndarray:
        """How many UTF-8 bytes of text each id stands for (0 for special tokens).

        Used for bits per byte, which compares models across tokenizers.
        """
        return np.array([len(b) for b in self.token_byte_strings()], dtype=np.int64)

    def chat_token_ids(self) -> ChatTokenIds | None:
        """The ids of the reserved chat tokens, or None if this tokenizer predates them."""
        ids = [self._special_id(token) for token in CHAT_TOKENS]
        return None if None in ids else ChatTokenIds(*ids)

    def _special_id(self, token: str) -> int | None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of the tokenizer file: token caches are keyed by it."""
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]


class BPETokenizer(BaseTokenizer):
    kind = "bpe"
    filename = "tokenizer.json"

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer
        # Special tokens typed by a user are ordinary text, never control tokens.
        self._tok.encode_special_tokens = True

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[EOT_TOKEN, PAD_TOKEN, *CHAT_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_bytes(cls, data: bytes) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(data.decode("utf-8")))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except (TypeError, ValueError, RuntimeError):  # a lone surrogate: not a character
            return self._tok.encode(without_lone_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            encoded = self._tok.encode_batch(texts, add_special_tokens=False)
        except (TypeError, ValueError, RuntimeError):
            encoded = self._tok.encode_batch([without_lone_surrogates(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def _special_id(self, token: str) -> int | None:
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return added.get(token)

    def _byte_strings(self) -> list[bytes]:
        # Each piece is spelt in the byte-level alphabet: map its characters back to bytes.
        back = {c: b for b, c in byte_to_unicode().items()}
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        table = [b""] * self.vocab_size
        for piece, idx in self._tok.get_vocab().items():
            if idx not in special:
                table[idx] = bytes(back[ch] for ch in piece if ch in back)
        return table

    def to_bytes(self) -> bytes:
        return self._tok.to_str().encode("utf-8")


_SPM_TOO_HIGH = re.compile(r"value <= (\d+)")
_SPM_TOO_LOW = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")


class SentencePieceTokenizer(BaseTokenizer):
    kind = "sentencepiece"
    filename = "tokenizer.model"

    def __init__(self, proto: bytes) -> None:
        import sentencepiece as spm

        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        texts = list(texts)  # a retry with another vocabulary size needs the texts again
        for _attempt in range(4):
            buf = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(texts),
                    model_writer=buf,
                    vocab_size=vocab_size,
                    model_type="unigram",
                    byte_fallback=True,
                    # Identity normalisation and no dummy prefix keep decode(encode(x)) == x.
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    add_dummy_prefix=False,
                    allow_whitespace_only_pieces=True,
                    character_coverage=0.9999,
                    unk_id=2, bos_id=-1, eos_id=EOT_ID, pad_id=PAD_ID,
                    eos_piece=EOT_TOKEN, pad_piece=PAD_TOKEN,
                    # Control pieces are never produced from text, only placed by id.
                    control_symbols=list(CHAT_TOKENS),
                    # Newlines would otherwise cost a byte-fallback token each.
                    user_defined_symbols=["\n"],
                    max_sentence_length=1 << 16,
                    input_sentence_size=2_000_000,
                    shuffle_input_sentence=True,
                    minloglevel=2,
                )
                return cls(buf.getvalue())
            except RuntimeError as exc:
                # The library says which size would work: too many pieces for little data,
                # or too few for every character plus the 256 byte pieces. Retry with it.
                too_high, too_low = _SPM_TOO_HIGH.search(str(exc)), _SPM_TOO_LOW.search(str(exc))
                if too_high and int(too_high.group(1)) < vocab_size:
                    vocab_size = int(too_high.group(1))
                elif too_low and int(too_low.group(1)) > vocab_size:
                    vocab_size = int(too_low.group(1))
                else:
                    raise ValueError(f"SentencePiece could not train on this data: {exc}") from exc
        raise ValueError("SentencePiece could not find a vocabulary size that fits this data")

    @classmethod
    def from_bytes(cls, data: bytes) -> "SentencePieceTokenizer":
        return cls(data)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        try:
            return self._sp.encode(text)
        except RuntimeError:  # a lone surrogate (e.g. typed on a terminal that is not UTF-8)
            return self._sp.encode(without_lone_surrogates(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Every core the process may use: a fixed count would leave a big machine idle.
        try:
            return self._sp.encode(texts, num_threads=usable_cpu_cores())
        except RuntimeError:
            return self._sp.encode([without_lone_surrogates(t) for t in texts], num_threads=usable_cpu_cores())

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def _special_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.is_control(i) and self._sp.id_to_piece(i) == token else None

    def _byte_strings(self) -> list[bytes]:
        # Byte-fallback pieces are spelt "<0xE6>"; the others are text with U+2581 for a space.
        table = []
        for i in range(self.vocab_size):
            piece = self._sp.id_to_piece(i)
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                table.append(b"")
            elif self._sp.is_byte(i):
                table.append(bytes([int(piece[3:-1], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def to_bytes(self) -> bytes:
        return self._proto


_CLASSES = {"bpe": BPETokenizer, "sentencepiece": SentencePieceTokenizer}


def normalize_kind(kind: str) -> str:
    k = kind.strip().lower()
    aliases = {"": "bpe", "1": "bpe", "b": "bpe", "2": "sentencepiece", "sp": "sentencepiece",
               "s": "sentencepiece", "spm": "sentencepiece"}
    k = aliases.get(k, k)
    if k not in _CLASSES:
        raise ValueError(f"unknown tokenizer {kind!r}; choose bpe or sentencepiece")
    return k


def supported_vocab_size(requested: int, n_bytes: int) -> int:
    """Cap the vocabulary by the amount of text: few examples per token train badly.

    About one new token per 40 bytes of text keeps each token seen often enough;
    the floor leaves room for the byte alphabet.
    """
    return max(MIN_VOCAB, min(requested, n_bytes // 40))


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> BaseTokenizer:
    kind = normalize_kind(kind)
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocabulary size {vocab_size} is too small; use at least {MIN_VOCAB}")
    try:
        return _CLASSES[kind].train(texts, vocab_size)
    except ValueError:
        raise
    except BaseException as exc:  # Rust panics surface as BaseException subclasses
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"training the {kind} tokenizer failed: {exc}") from exc


def tokenizer_class(kind: str) -> type[BaseTokenizer]:
    """The class for a tokenizer kind (its ``filename`` says which file holds it)."""
    return _CLASSES[normalize_kind(kind)]


def tokenizer_from_bytes(kind: str, data: bytes, where: str) -> BaseTokenizer:
    """Rebuild a saved tokenizer; ``where`` names the file in the error message."""
    try:
        return tokenizer_class(kind).from_bytes(data)
    except BaseException as exc:  # Rust panics surface as BaseException subclasses
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"cannot read the tokenizer {where}: {exc}") from exc


def chunk_text(text: str, max_chars: int = 4000) -> Iterator[str]:
    """Split text at line ends into pieces of at most ``max_chars`` (for tokenizer training)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut > start:
                end = cut + 1
        yield text[start:end]
        start = end
