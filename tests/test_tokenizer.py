"""Both tokenizers: exact round trips, special tokens, byte counts, small data."""
import numpy as np
import pytest

from engine.data.tokenizer import (
    EOT_ID,
    KINDS,
    MIN_VOCAB,
    PAD_ID,
    byte_to_unicode,
    normalize_kind,
    supported_vocab_size,
    train_tokenizer,
)
from engine.data.vocab_growth import expand_tokenizer
from engine.folder.model_folder import ModelFolder, tokenizer_files
from engine.runtime import storage

from conftest import SAMPLE_TEXT

ROUND_TRIP = [
    "",
    "a",
    " leading and trailing spaces  ",
    "line one\nline two\n\n\ttabbed",
    "naïve café, Zürich, São Paulo",
    "日本語のテキストと中文",
    "emoji 😀🚀 and a family 👨‍👩‍👧",
    "Ελληνικά и русский текст",
    "<|endoftext|> is just text here",
    "x" * 500,
]


@pytest.fixture(scope="module", params=KINDS)
def trained(request):
    return train_tokenizer(request.param, [SAMPLE_TEXT], 400)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_special_tokens_are_shared_and_not_injectable(trained):
    assert trained.eot_id == EOT_ID == 0 and trained.pad_id == PAD_ID == 1
    assert EOT_ID not in trained.encode("<|endoftext|><|pad|>")


def test_token_bytes_count_utf8_bytes(trained):
    lengths = trained.token_bytes()
    assert lengths[EOT_ID] == 0 and lengths[PAD_ID] == 0
    for text in ROUND_TRIP:
        assert int(lengths[trained.encode(text)].sum()) == len(text.encode("utf-8"))


def reference_token_bytes(tok):
    """token_bytes as it was computed before it came from the byte table: the anchor."""
    lengths = np.zeros(tok.vocab_size, dtype=np.int64)
    if tok.kind == "bpe":
        back = {c: b for b, c in byte_to_unicode().items()}
        special = {i for i, t in tok._tok.get_added_tokens_decoder().items() if t.special}
        for piece, idx in tok._tok.get_vocab().items():
            if idx not in special:
                lengths[idx] = sum(1 for ch in piece if ch in back)
        return lengths
    sp = tok._sp
    for i in range(tok.vocab_size):
        if not (sp.is_control(i) or sp.is_unknown(i)):
            lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def test_byte_table_spells_every_text_and_gives_the_same_byte_counts(trained):
    grown = expand_tokenizer(trained, ["zebra quokka narwhal " * 50], max_new=10).tokenizer
    for tok in (trained, grown):
        table = tok.token_byte_strings()
        assert len(table) == tok.vocab_size and table[EOT_ID] == table[PAD_ID] == b""
        assert np.array_equal(tok.token_bytes(), reference_token_bytes(tok))
        for text in ROUND_TRIP + ["zebra quokka"]:
            assert b"".join(table[i] for i in tok.encode(text)) == text.encode("utf-8")
    assert grown.vocab_size > trained.vocab_size  # the grown pieces were in the table too


def test_save_and_load(trained, tmp_path):
    storage.commit_files(tmp_path, tokenizer_files(trained))
    again = ModelFolder(tmp_path).load_tokenizer()
    assert again.kind == trained.kind and again.vocab_size == trained.vocab_size
    assert again.encode(SAMPLE_TEXT) == trained.encode(SAMPLE_TEXT)
    assert (tmp_path / "tokenizer_type.txt").read_text().strip() == trained.kind


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_data_lowers_vocabulary_instead_of_crashing(kind):
    tok = train_tokenizer(kind, ["just a couple of words, nothing more"], 10_000)
    assert tok.vocab_size < 10_000
    assert tok.decode(tok.encode("words 😀")) == "words 😀"


def test_supported_vocab_size_scales_with_data():
    assert supported_vocab_size(10_000, 2_000) == MIN_VOCAB
    assert supported_vocab_size(8_000, 10_000_000) == 8_000
    assert supported_vocab_size(8_000, 100_000) == 2_500


def test_kind_names():
    assert normalize_kind("") == "bpe"
    assert normalize_kind(" SentencePiece ") == "sentencepiece"
    with pytest.raises(ValueError, match="choose bpe or sentencepiece"):
        normalize_kind("wordpiece")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train a model first"):
        ModelFolder(tmp_path).load_tokenizer()
