"""How files that are not clean UTF-8 are read: detected, decoded, and reported to the user."""

import pytest

from engine.data.sources import BLOCK_CHARS, SAMPLE_SLICES, SLICE_BYTES, SNIFF_BYTES, open_source

# A paragraph as a Windows word processor saves it: curly quotes and apostrophes, dashes,
# an ellipsis, accented letters (ï is where a wrong Windows code page shows: cp1250 reads ď).
NOVEL = ("“Well,” she said — it’s late… isn’t it? ‘Yes,’ he replied – the miller’s café was naïve, "
         "and Zoë’s crème brûlée was gone.\n")
PUNCTUATION = "’“”–—…‘"


def read_back(path):
    src = open_source(str(path))
    return "".join("".join(doc) for doc in src.documents()), src.notes


def assert_same_text(got: str, expected: str) -> None:
    """Equality that reports where a megabyte of text differs (pytest's full diff takes minutes)."""
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise AssertionError(f"texts differ at {at} (lengths {len(got)}, {len(expected)}): "
                             f"{got[at - 20:at + 20]!r} != {expected[at - 20:at + 20]!r}")


def test_windows_1252_novel_keeps_its_quotes_and_says_so(tmp_path):
    path = tmp_path / "novel.txt"
    path.write_bytes((NOVEL * 40).encode("cp1252"))
    text, notes = read_back(path)
    assert text == NOVEL * 40
    assert all(ch in text for ch in PUNCTUATION)
    assert not any("\x80" <= ch <= "\x9f" for ch in text)  # no invisible C1 controls
    assert notes == ["novel.txt: not UTF-8; read as Windows-1252 (cp1252); "
                     "save the file as UTF-8 if the text looks wrong"]


def test_windows_1252_text_that_starts_as_plain_ascii_is_still_detected(tmp_path):
    # The first curly quote comes after the first 64 KB and after the first read block.
    path = tmp_path / "late.txt"
    ascii_start = "The river ran past the old mill, and nobody said a word.\n" * (BLOCK_CHARS // 50)
    path.write_bytes((ascii_start + NOVEL * 3).encode("cp1252"))
    text, notes = read_back(path)
    assert_same_text(text, ascii_start + NOVEL * 3)
    assert len(notes) == 1 and "Windows-1252 (cp1252)" in notes[0] and "replaced" not in notes[0]


def test_stray_bytes_after_the_sniffed_head_of_a_utf8_file_are_counted(tmp_path):
    path = tmp_path / "mostly.txt"
    good = "naïve café — 日本語 😀 fine.\n" * (SNIFF_BYTES // 20)
    tail = "the end, Zoë.\n"
    path.write_bytes(good.encode() + b"bad \xff here, \xfe there and \x80 too\n" + tail.encode())
    text, notes = read_back(path)
    assert_same_text(text, good + "bad \ufffd here, \ufffd there and \ufffd too\n" + tail)
    assert notes == ["mostly.txt: not valid UTF-8 throughout; read as UTF-8, 3 undecodable bytes replaced"]


def test_undecodable_bytes_in_the_detected_encoding_are_counted_over_the_whole_file(tmp_path):
    # 0x81 and 0x9d mean nothing in Windows-1252. They sit halfway between two of the
    # detector's sample slices, so only the pass over the whole file can find them.
    path = tmp_path / "odd.txt"
    body = (NOVEL * (2**20 // len(NOVEL))).encode("cp1252")
    size = len(body) + 6
    at = int(7.5 * (size - SLICE_BYTES) / (SAMPLE_SLICES - 1))
    at = body.index(b"\n", at) + 1
    path.write_bytes(body[:at] + b"x\x81y\x9dz\n" + body[at:])
    text, notes = read_back(path)
    assert_same_text(text, body[:at].decode("cp1252") + "x\ufffdy\ufffdz\n" + body[at:].decode("cp1252"))
    assert notes == ["odd.txt: not UTF-8; read as Windows-1252 (cp1252), 2 undecodable bytes replaced; "
                     "save the file as UTF-8 if the text looks wrong"]


def test_valid_utf8_gives_no_note_even_with_a_character_across_a_block_boundary(tmp_path):
    path = tmp_path / "clean.txt"
    text = "a" * (BLOCK_CHARS - 2) + "😀" + NOVEL  # the emoji's 4 bytes straddle the first block
    path.write_bytes(text.encode("utf-8"))
    got, notes = read_back(path)
    assert_same_text(got, text)
    assert notes == []


@pytest.mark.parametrize("encoding, sample", [
    ("cp1251", "Привет, как дела? Это простой русский текст, а не английский.\n"),
    ("cp1252", NOVEL),
], ids=["cp1251", "cp1252"])
def test_other_legacy_encodings_decode(tmp_path, encoding, sample):
    path = tmp_path / "other.txt"
    path.write_bytes((sample * 50).encode(encoding))
    text, notes = read_back(path)
    assert text == sample * 50 and f"({encoding})" in notes[0]


def test_detection_reads_a_bounded_sample_of_a_megabyte_and_is_deterministic(tmp_path, monkeypatch):
    """The detector's cost grows with what it is given: a 1 MB file gives it a fixed sample."""
    import charset_normalizer

    path = tmp_path / "big.txt"
    path.write_bytes((NOVEL * (2**20 // len(NOVEL))).encode("cp1252"))  # dense with quotes: the slow case
    given = []
    real = charset_normalizer.from_bytes
    monkeypatch.setattr(charset_normalizer, "from_bytes", lambda sample, *a, **k: given.append(len(sample))
                        or real(sample, *a, **k))
    first = open_source(str(path))
    assert len(given) == 1 and given[0] <= (SAMPLE_SLICES + 1) * (SLICE_BYTES + 1)
    assert open_source(str(path)).notes == first.notes
    assert "(cp1252)" in first.notes[0]


def test_the_note_reaches_the_user_before_training(tmp_path):
    from interface import main

    from conftest import TINY_CLI

    path = tmp_path / "novel.txt"
    path.write_bytes((NOVEL * 40).encode("cp1252"))
    answers = iter(["bpe", "1", "1", str(path)])  # then end of input at the epochs prompt

    def scripted_input(prompt):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    out = []
    assert main(["--model-dir", str(tmp_path / "model"), *TINY_CLI], scripted_input, out.append) == 0
    assert "Note: novel.txt: not UTF-8; read as Windows-1252 (cp1252)" in "\n".join(out)
