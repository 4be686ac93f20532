"""Reading user data: files, folders, odd encodings, bad input, caching, windows."""
import codecs

import numpy as np
import pytest

from engine.data.sources import BUILTIN_NAME, open_source, source_from_text
from engine.data.tokenizer import EOT_ID, train_tokenizer
from engine.data.windows import TokenDataset, tokenize_source

from conftest import SAMPLE_TEXT


def test_empty_answer_means_builtin_corpus():
    src = open_source("")
    assert src.name == BUILTIN_NAME
    assert src.n_bytes > 300_000  # real text, not a stub
    assert any("if" in t for t in src.texts)


def test_folder_reads_txt_and_md_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# beta", encoding="utf-8")
    (tmp_path / "c.py").write_text("ignored = True", encoding="utf-8")
    src = open_source(str(tmp_path))
    assert [p.name for p in src.paths] == ["a.txt", "b.md"]
    docs = ["".join(d) for d in src.documents()]
    assert docs == ["alpha text", "# beta"]


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or folder"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "PNG image"),
    (lambda p: p.write_bytes(b"abc\x00\x01\x02def"), "binary"),
])
def test_bad_files_get_clear_messages(tmp_path, make, message):
    path = tmp_path / "input.txt"
    make(path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        open_source(str(path))


def test_folder_without_text_files(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="no .txt or .md files"):
        open_source(str(tmp_path))


def test_whitespace_only_file_has_no_text(tmp_path, model_dir):
    path = tmp_path / "blank.txt"
    path.write_text("   \n\n\t \n", encoding="utf-8")
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], 300)
    with pytest.raises(ValueError, match="no text"):
        tokenize_source(open_source(str(path)), tok, model_dir / "cache")


def test_utf16_and_latin1_are_decoded(tmp_path):
    utf16 = tmp_path / "u16.txt"
    utf16.write_bytes(codecs.BOM_UTF16_LE + "héllo wörld".encode("utf-16-le"))
    src = open_source(str(utf16))
    assert "".join(next(src.documents())) == "héllo wörld"
    assert "UTF-16" in src.notes[0]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    src = open_source(str(latin))
    assert "".join(next(src.documents())) == "café crème"
    assert "not UTF-8; read as Windows-1252" in src.notes[0]  # a superset of Latin-1's letters


def test_typed_text_must_not_be_empty():
    with pytest.raises(ValueError, match="empty"):
        source_from_text("  \n ")


def test_tokens_are_cached_and_documents_joined(tmp_path):
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], 300)
    src = source_from_text("first document")
    src.texts.append("second document")
    ids = tokenize_source(src, tok, tmp_path)
    assert list(ids).count(EOT_ID) == 2 and ids[-1] == EOT_ID
    files = list(tmp_path.glob("*.bin"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = tokenize_source(src, tok, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime  # read back, not re-tokenized
    assert np.array_equal(np.asarray(again), np.asarray(ids))
    assert tok.decode(ids) == "first documentsecond document"


def test_windows_split_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    ds = TokenDataset(tokens, context=32, val_fraction=0.05)
    assert len(ds.val) == 50 and len(ds.train) == 950
    plan = ds.epoch_plan(seed=1, epoch=0, batch_size=4)
    x, y = ds.train_batch(plan, 0)
    assert x.shape == (4, 32) and bool((y == x + 1).all())
    assert int(x.max()) < 950  # never reads validation tokens
    assert ds.epoch_plan(1, 0, 4).order.tolist() == plan.order.tolist()  # reproducible
    assert ds.epoch_plan(1, 1, 4).order.tolist() != plan.order.tolist()  # reshuffled per epoch
    val = list(ds.val_batches(8))
    assert all(int(vx.min()) >= 950 for vx, _ in val)


def test_short_text_gets_a_shorter_window_or_a_clear_error():
    ds = TokenDataset(np.arange(40, dtype=np.uint16), context=256)
    assert ds.shortened and ds.window == 19 and ds.n_windows >= 1
    with pytest.raises(ValueError, match="too short"):
        TokenDataset(np.arange(10, dtype=np.uint16), context=256)


def _peak_growth_tokenizing(tmp_path, megabytes: int) -> tuple[int, int]:
    """Tokenize a generated file of ``megabytes`` in a fresh process: (ids, peak RSS growth in KiB)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    big = tmp_path / f"big{megabytes}.txt"
    line = (SAMPLE_TEXT.replace("\n\n", "\n") * 2)[:4000]
    with open(big, "w", encoding="utf-8") as f:
        for i in range(megabytes * 2**20 // len(line) + 1):
            f.write(f"{i} {line}")
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import SAMPLE_TEXT
from engine.data.sources import open_source
from engine.data.windows import tokenize_source
from engine.data.tokenizer import train_tokenizer
tok = train_tokenizer("bpe", [SAMPLE_TEXT], 400)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = tokenize_source(open_source({str(big)!r}), tok, {str(tmp_path / f'cache{megabytes}')!r})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(ids), after - before)
"""
    # One encoding thread: with a pool, how many blocks are in flight at once (and so the
    # peak) depends on how busy the machine is, by more than the margin the test reads.
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_ids, grew_kib = map(int, proc.stdout.split())
    return n_ids, grew_kib


@pytest.mark.slow
def test_tokenizing_a_big_file_takes_memory_that_does_not_grow_with_the_file(tmp_path):
    """Tokenizing streams: neither the file nor its ids as Python ints are ever held whole.

    Peak memory is measured at two sizes. Streaming costs about the same at both (the
    tokenizer's own buffers: ~73 MiB at 4, 12 and 24 MB here); holding the larger
    file's text would add 12 MiB more than the smaller one's, its ids as a Python list
    over 30 MiB, and encoding it in one call about 2 GiB.
    """
    small_ids, small_kib = _peak_growth_tokenizing(tmp_path, 2)
    big_ids, big_kib = _peak_growth_tokenizing(tmp_path, 14)
    assert big_ids > 5_000_000 and big_ids > 6 * small_ids
    extra_mib = (big_kib - small_kib) / 1024
    assert extra_mib < 8, f"tokenizing 14 MB took {extra_mib:.0f} MiB more at its peak than 2 MB did"
    assert big_kib / 1024 < 200, f"peak memory grew by {big_kib // 1024} MiB while tokenizing 14 MB"
