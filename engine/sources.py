"""Training text: where it comes from and how it is read (the first step: text).

A ``Source`` is a file, a folder of ``.txt``/``.md`` files, typed text or the built-in
corpus. Each file (or typed text) is one document. Files are read in blocks, so a
file larger than memory streams. ``windows.py`` turns a source into token ids.
"""
from __future__ import annotations

import codecs
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from engine.tokenizer import chunk_text

TEXT_SUFFIXES = (".txt", ".md")
BLOCK_CHARS = 1 << 20  # read files a megabyte at a time
SNIFF_BYTES = 1 << 16
BUILTIN_NAME = "built-in corpus (Python documentation topics)"
# Binary formats whose first bytes are unmistakable.
_MAGIC = {b"\x89PNG": "a PNG image", b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive",
          b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"\x7fELF": "a program"}


def _sniff_encoding(path: Path) -> tuple[str, str | None]:
    """Decide how to decode a file from its first bytes; returns (encoding, note)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise ValueError(f"{path} looks like {what}, not text; give a UTF-8 text file")
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig", None
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", f"{path.name}: read as UTF-16 (it has a byte-order mark)"
    if b"\x00" in head:
        raise ValueError(f"{path} contains NUL bytes: it is binary, not text")
    try:
        # A multi-byte character may be cut at the end of the sample: decode incrementally.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return "utf-8", None
    except UnicodeDecodeError:
        return "latin-1", f"{path.name}: not valid UTF-8, read as Latin-1"


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
    """The Python documentation topics shipped with every CPython (``pydoc_data``).

    About 460 KB of real English technical prose, present wherever Python is, so a
    new user can train a first model without a file of their own.
    """
    from pydoc_data.topics import topics

    return Source(name=BUILTIN_NAME, texts=[topics[k] for k in sorted(topics)])


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
