"""Training text: where it comes from and how it is read (the first step: text).

A ``Source`` is a file, a folder of ``.txt``/``.md`` files, typed text or the built-in
corpus. Each file (or typed text) is one document. Files are read in blocks, so a
file larger than memory streams. ``windows.py`` turns a source into token ids.

A file is read as UTF-8 when the whole of it is valid UTF-8 (or it has a byte-order
mark). Anything else, such as a novel saved by an old Windows editor, has its encoding
detected, and ``Source.notes`` tells the user which encoding was used and how many
bytes could not be decoded, so curly quotes never turn silently into invisible
control characters.
"""
from __future__ import annotations

import codecs
import hashlib
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from engine.data.conversations import builtin_conversation_documents
from engine.data.tokenizer import chunk_text

TEXT_SUFFIXES = (".txt", ".md")
BLOCK_CHARS = 1 << 20  # read files a megabyte at a time
SNIFF_BYTES = 1 << 16
BUILTIN_NAME = "built-in corpus (everyday conversations as plain text)"
# Binary formats whose first bytes are unmistakable.
_MAGIC = {b"\x89PNG": "a PNG image", b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive",
          b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"\x7fELF": "a program"}


# Decoding with this error handler counts undecodable bytes (see ``_count_undecodable``).
COUNT_ERRORS = "custom_llm.count_undecodable"
SAMPLE_SLICES = 16  # the detector sees this many slices spread over the file ...
SLICE_BYTES = 4096  # ... of about this size each, plus one around the first non-UTF-8 byte
_ASCII = bytes(range(0x80))
# When the detector ranks several encodings exactly alike, the one most text is written in wins.
_PREFERRED_ON_TIE = ("cp1252", "latin_1", "iso8859_15")
_DISPLAY_NAMES = {"latin_1": "Latin-1", "utf_8": "UTF-8", "shift_jis": "Shift JIS", "euc_jp": "EUC-JP",
                  "euc_kr": "EUC-KR", "gb18030": "GB18030", "gb2312": "GB2312", "big5": "Big5",
                  "koi8_r": "KOI8-R", "koi8_u": "KOI8-U", "mac_roman": "Mac Roman", "cp932": "Shift JIS (Windows)",
                  "cp936": "GBK", "cp949": "Korean (Windows)", "cp950": "Big5 (Windows)"}


@dataclass
class _DecodeTally:
    """What one pass of decoding a whole file found."""

    undecodable: int = 0  # bytes replaced by U+FFFD
    first_undecodable: int | None = None  # about where the first of them is
    non_ascii: int = 0  # bytes from 0x80 up
    offset: int = 0  # where the block being decoded starts in the file


_tally: ContextVar[_DecodeTally | None] = ContextVar("_tally", default=None)


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    """A codec error handler: replace like ``errors="replace"`` and count the bytes."""
    tally = _tally.get()
    if tally is not None and isinstance(exc, UnicodeDecodeError):
        tally.undecodable += exc.end - exc.start
        if tally.first_undecodable is None:
            tally.first_undecodable = tally.offset + exc.start
    return "\ufffd", exc.end


codecs.register_error(COUNT_ERRORS, _count_and_replace)


def _count_undecodable(path: Path, encoding: str) -> _DecodeTally:
    """Decode the whole file block by block (memory stays bounded) and count what fails."""
    tally = _DecodeTally()
    token = _tally.set(tally)
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors=COUNT_ERRORS)
        with open(path, "rb") as f:
            while block := f.read(BLOCK_CHARS):
                tally.non_ascii += len(block.translate(None, _ASCII))
                decoder.decode(block)
                tally.offset += len(block)
            decoder.decode(b"", final=True)
    finally:
        _tally.reset(token)
    return tally


def _whole_lines(piece: bytes, cut_start: bool, cut_end: bool) -> bytes:
    r"""Trim the partial lines at the cut ends of a slice, so no character is split.

    A newline byte is a newline in every encoding that can reach the detector (UTF-16
    and UTF-32 are caught by their BOM or their NUL bytes first).

    >>> _whole_lines(b"ial line\nwhole line\npart", True, True)
    b'whole line\n'
    """
    if cut_start and (at := piece.find(b"\n")) != -1:
        piece = piece[at + 1:]
    if cut_end and (at := piece.rfind(b"\n")) != -1:
        piece = piece[:at + 1]
    return piece


def _detection_sample(path: Path, around: int | None) -> bytes:
    """A bounded sample for the detector, whatever the file's size.

    Slices spread evenly over the file, plus one around ``around`` (the first byte
    that is not UTF-8), so a file whose only non-ASCII bytes are few is still judged
    on them.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= (SAMPLE_SLICES + 1) * SLICE_BYTES:
            return f.read()
        starts = {i * (size - SLICE_BYTES) // (SAMPLE_SLICES - 1) for i in range(SAMPLE_SLICES)}
        if around is not None:
            starts.add(min(size - SLICE_BYTES, max(0, around - SLICE_BYTES // 2)))
        pieces = []
        for start in sorted(starts):
            f.seek(start)
            pieces.append(_whole_lines(f.read(SLICE_BYTES), start > 0, start + SLICE_BYTES < size))
    return b"\n".join(pieces)


def _detect_legacy_encoding(sample: bytes) -> str | None:
    """The Python codec that best explains ``sample`` (charset-normalizer), or None.

    The detector is deterministic, but on English text it often ranks several Windows
    code pages exactly alike and lists them alphabetically, so cp1250 would win and
    turn "naïve" into "naďve". On such a tie the commonest encoding is taken.
    """
    from charset_normalizer import from_bytes

    matches = from_bytes(sample)
    best = matches.best()
    if best is None:
        return None
    tied = {name for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)
            for name in m.could_be_from_charset}
    return next((name for name in _PREFERRED_ON_TIE if name in tied), best.encoding)


def _display_name(codec: str) -> str:
    """How people call an encoding: 'cp1252' -> 'Windows-1252'."""
    if codec.startswith("cp125"):
        return "Windows-" + codec[2:]
    if codec.startswith("iso8859_"):
        return "ISO-8859-" + codec.split("_")[1]
    return _DISPLAY_NAMES.get(codec, codec)


def _replaced(count: int) -> str:
    return f"{count} undecodable byte{'s' if count != 1 else ''} replaced"


def _sniff_encoding(path: Path) -> tuple[str, str | None]:
    """Decide how to decode a file; returns (encoding, note for the user or None).

    A byte-order mark decides. Otherwise the whole file is checked for UTF-8 (a
    novel can be plain ASCII for a megabyte before its first curly quote). A file that
    is not UTF-8 goes to a detector, and the note names the encoding chosen and how
    many bytes it still could not decode.
    """
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise ValueError(f"{path} looks like {what}, not text; give a UTF-8 text file")
    if head.startswith(codecs.BOM_UTF8):
        encoding, note = "utf-8-sig", None
    elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, note = "utf-16", f"{path.name}: read as UTF-16 (it has a byte-order mark)"
    elif b"\x00" in head:
        raise ValueError(f"{path} contains NUL bytes: it is binary, not text")
    else:
        return _detect_encoding(path)
    bad = _count_undecodable(path, encoding).undecodable
    if bad:
        note = f"{note}, {_replaced(bad)}" if note else f"{path.name}: {_replaced(bad)}"
    return encoding, note


def _detect_encoding(path: Path) -> tuple[str, str | None]:
    """The encoding of a file without a byte-order mark, and a note if it is not UTF-8."""
    utf8 = _count_undecodable(path, "utf-8")
    if not utf8.undecodable:
        return "utf-8", None
    # Text in a legacy encoding almost never forms valid multi-byte UTF-8 by chance: when
    # most non-ASCII bytes do, this is UTF-8 with a few damaged bytes, and any 8-bit
    # code page would garble every other accented letter.
    if utf8.non_ascii - utf8.undecodable > utf8.undecodable:
        return "utf-8", f"{path.name}: not valid UTF-8 throughout; read as UTF-8, {_replaced(utf8.undecodable)}"
    encoding = _detect_legacy_encoding(_detection_sample(path, utf8.first_undecodable))
    if encoding is None or encoding in ("utf_8", "ascii"):
        return "utf-8", (f"{path.name}: not UTF-8 and no other encoding fits; read as UTF-8, "
                         f"{_replaced(utf8.undecodable)}; save the file as UTF-8 if the text looks wrong")
    note = f"{path.name}: not UTF-8; read as {_display_name(encoding)} ({encoding})"
    bad = _count_undecodable(path, encoding).undecodable
    if bad:
        note += f", {_replaced(bad)}"
    return encoding, note + "; save the file as UTF-8 if the text looks wrong"


@dataclass
class Source:
    """Text to train on. Exactly one of ``paths`` or ``text`` is set."""

    name: str
    paths: list[Path] = field(default_factory=list)
    texts: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    _encodings: dict = field(default_factory=dict, repr=False)

    @property
    def n_bytes(self) -> int:
        if self.texts is not None:
            return sum(len(t.encode("utf-8")) for t in self.texts)
        return sum(p.stat().st_size for p in self.paths)

    def content_hash(self) -> str:
        """SHA-256 of the content (streamed), the key of the token cache."""
        h = hashlib.sha256()
        if self.texts is not None:
            for t in self.texts:
                h.update(t.encode("utf-8"))
                h.update(b"\x00")
        else:
            for p in self.paths:
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                h.update(b"\x00")
        return h.hexdigest()

    def documents(self) -> Iterator[Iterator[str]]:
        """Each document as an iterator of text blocks (so big files stream)."""
        if self.texts is not None:
            for t in self.texts:
                yield iter([t])
            return
        for p in self.paths:
            yield self._read_blocks(p)

    def _read_blocks(self, path: Path) -> Iterator[str]:
        encoding = self._encodings[path]
        with open(path, encoding=encoding, errors="replace", newline="") as f:
            while block := f.read(BLOCK_CHARS):
                yield block

    def sample_for_tokenizer(self, max_bytes: int = 20_000_000) -> Iterator[str]:
        """Chunks of text for tokenizer training, evenly spread if the source is huge."""
        total = max(1, self.n_bytes)
        keep_every = max(1, math.ceil(total / max_bytes))
        i = 0
        for doc in self.documents():
            for block in doc:
                for chunk in chunk_text(block):
                    if i % keep_every == 0:
                        yield chunk
                    i += 1


def source_from_text(text: str, name: str = "typed text") -> Source:
    if not text.strip():
        raise ValueError("the text is empty; type some text to train on")
    return Source(name=name, texts=[text])


def source_from_texts(texts: list[str], name: str) -> Source:
    """Several texts (each one document) as one source; empty ones are left out."""
    kept = [t for t in texts if t and t.strip()]
    if not kept:
        raise ValueError("the new data is empty; give some text to train on")
    return Source(name=name, texts=kept)


def builtin_source() -> Source:
    """The built-in text: the built-in conversations that fine-tuning trains on, as plain text.

    A first model learns its English from what people say to each other, the kind of text
    its chat replies will be: pretrained on it, the first session's replies had more English
    words and ended their turns more often than after the Python documentation topics that
    every CPython ships (README "A first session"). One conversation a document, one turn a
    line, no role names; the conversations that fine-tuning (at the default seed) holds out
    are left out, so its held-out loss still measures conversations the model never read.
    """
    return Source(name=BUILTIN_NAME, texts=builtin_conversation_documents())


def open_source(spec: str) -> Source:
    """A file or folder path typed by the user; an empty answer means the built-in corpus."""
    spec = spec.strip().strip('"').strip("'")
    if not spec:
        return builtin_source()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no .txt or .md files")
    else:
        files = [path]
    src = Source(name=str(path), paths=[])
    for p in files:
        try:
            if p.stat().st_size == 0:
                src.notes.append(f"{p.name}: empty, skipped")
                continue
            enc, note = _sniff_encoding(p)
        except ValueError as exc:
            if len(files) == 1:
                raise
            src.notes.append(f"skipped: {exc}")
            continue
        except OSError as exc:
            raise ValueError(f"cannot read {p}: {exc.strerror}") from exc
        if note:
            src.notes.append(note)
        src._encodings[p] = enc
        src.paths.append(p)
    if not src.paths:
        raise ValueError(f"{path} holds no text (the file is empty)" if path.is_file()
                         else f"{path} holds no readable text files")
    return src
