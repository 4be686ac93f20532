"""Generation: sampling rules, cached == uncached, streaming text, the three modes."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data.chat_format import Message
from engine.data.tokenizer import KINDS, chunk_text, train_tokenizer
from engine.runtime import hardware
from response_generator import (
    CHAT_STOPS,
    ChatSession,
    GenerationConfig,
    ResponseGenerator,
    TextStreamer,
    apply_repetition_penalty,
    best_candidates,
    render_plain,
    sample_next_token,
)

from conftest import SAMPLE_TEXT


@pytest.fixture(scope="module")
def trained_dir(trained_once):
    return trained_once("bpe", 2)


@pytest.fixture(scope="module")
def trained_gpt2_dir(trained_once):
    """The tiny model with the GPT-2 block (old folders' and ``--arch gpt2``)."""
    return trained_once("bpe", 2, arch="gpt2")


@pytest.fixture(params=["gpt2", "llama"])
def any_exact_generator(request, trained_dir, trained_gpt2_dir):
    """fp32 throughout, for each block: cached and uncached must then agree token for token."""
    folder = trained_gpt2_dir if request.param == "gpt2" else trained_dir
    generator = ResponseGenerator(str(folder), hardware.detect_runtime("cpu", "fp32"))
    assert generator.model.config.arch == request.param
    return generator


@pytest.fixture
def generator(trained_dir):
    return ResponseGenerator(str(trained_dir))


@pytest.fixture
def exact_generator(trained_dir):
    """fp32 throughout: the auto setting on a CPU reads fp16 weights when generating."""
    return ResponseGenerator(str(trained_dir), hardware.detect_runtime("cpu", "fp32"))


def test_greedy_with_cache_equals_full_recomputation(any_exact_generator):
    generator = any_exact_generator
    prompt = generator.tokenizer.encode("The river ran")
    cfg = GenerationConfig(max_new_tokens=60, temperature=0, repetition_penalty=1.0)
    cached = list(generator.generate_ids(prompt, cfg, use_cache=True))
    reference = list(generator.generate_ids(prompt, cfg, use_cache=False))
    assert len(cached) > 0
    assert cached == reference


def test_cache_equals_recomputation_past_the_window(any_exact_generator):
    generator = any_exact_generator
    # 80 new tokens on a 32-token context force the crop-and-refill path several times.
    prompt = generator.tokenizer.encode("Trains left the station")
    cfg = GenerationConfig(max_new_tokens=80, temperature=0, repetition_penalty=1.3)
    cached = list(generator.generate_ids(prompt, cfg, use_cache=True))
    assert len(cached) > 40
    assert cached == list(generator.generate_ids(prompt, cfg, use_cache=False))


def test_cache_equals_recomputation_for_a_prompt_longer_than_the_context(any_exact_generator):
    generator = any_exact_generator
    prompt = generator.tokenizer.encode("The river ran past the old mill, and the miller counted sacks " * 3)
    assert len(prompt) > 2 * generator.context
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.7, top_k=20, repetition_penalty=1.2, seed=4)
    cached = list(generator.generate_ids(prompt, cfg, use_cache=True))
    assert len(cached) > 20
    assert cached == list(generator.generate_ids(prompt, cfg, use_cache=False))


def test_seed_makes_answers_repeatable(generator):
    cfg = GenerationConfig(max_new_tokens=20, seed=11)
    assert "".join(generator.complete("In spring", cfg)) == "".join(generator.complete("In spring", cfg))


def test_replies_reuse_one_cache_but_two_at_once_never_share_it(generator):
    """A reply that has ended leaves its KV cache (and its views) to the next; one that
    is still running keeps it, so interleaved replies get what each gets alone, and a
    reply abandoned half-way leaves nothing behind for the next."""
    first, second = GenerationConfig(max_new_tokens=30, seed=1), GenerationConfig(max_new_tokens=30, seed=2)
    alone = ["".join(generator.complete("In spring", first)), "".join(generator.complete("The storm", second))]
    a, b = generator.complete("In spring", first), generator.complete("The storm", second)
    pieces: list[list[str]] = [[], []]
    for pair in zip(a, b):
        for got, piece in zip(pieces, pair):
            got.append(piece)
    pieces[0] += list(a)
    pieces[1] += list(b)
    assert ["".join(p) for p in pieces] == alone
    abandoned = generator.complete("The storm", second)
    next(abandoned)  # stopped after one piece, as Ctrl+C does
    abandoned.close()
    assert "".join(generator.complete("In spring", first)) == alone[0]


def test_ids_stay_inside_the_vocabulary(generator):
    cfg = GenerationConfig(max_new_tokens=40, temperature=2.0, top_k=0, top_p=1.0, seed=5)
    ids = list(generator.generate_ids([5, 6, 7], cfg))
    assert all(0 <= i < generator.tokenizer.vocab_size for i in ids)


def test_sample_next_token_rules():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0])
    g = random.Random(0)
    assert sample_next_token(logits, g, temperature=0) == 1
    picks = {sample_next_token(logits, g, temperature=1.0, top_k=2) for _ in range(200)}
    assert picks == {1, 3}
    # top-p keeps the smallest set whose mass reaches p: here the top token alone.
    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0])
    assert {sample_next_token(peaked, g, 1.0, top_p=0.5) for _ in range(50)} == {0}


def test_sampling_frequencies_follow_the_tempered_top_k_top_p_distribution():
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 1.5, 0.0])
    temperature, top_k, top_p = 0.7, 4, 0.9
    # The distribution written out the slow way: top 4, tempered softmax, then the
    # smallest prefix whose mass reaches 0.9, renormalised.
    order = torch.argsort(logits, descending=True)[:top_k]
    probs = torch.softmax(logits[order] / temperature, dim=0)
    before = torch.cumsum(probs, 0) - probs
    probs = torch.where(before < top_p, probs, 0.0)
    expected = torch.zeros_like(logits)
    expected[order] = probs / probs.sum()
    g = random.Random(1)
    n = 20_000
    counts = torch.bincount(torch.tensor([sample_next_token(logits, g, temperature, top_k, top_p)
                                          for _ in range(n)]), minlength=len(logits))
    assert counts[expected == 0].sum() == 0  # cut tokens never appear
    # Each kept frequency within 4 standard errors of its probability.
    se = (expected * (1 - expected) / n).sqrt()
    kept = expected > 0
    assert torch.all((counts[kept] / n - expected[kept]).abs() < 4 * se[kept] + 1e-9)


def test_repetition_penalty_lowers_recent_tokens():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40, unique=True),
       st.integers(1, 45), st.sets(st.integers(0, 39), max_size=20), st.sampled_from([1.0, 1.1, 2.0]))
def test_best_candidates_equal_penalising_the_whole_vocabulary(values, k, recent, penalty):
    """The few-candidates shortcut gives the same ranking as penalising every logit."""
    logits = torch.tensor(values)
    recent = {i for i in recent if i < len(values)}
    whole = apply_repetition_penalty(logits, torch.tensor(sorted(recent), dtype=torch.long), penalty)
    k = min(k, len(values))
    expected_values, expected_ids = torch.topk(whole, k)
    got_values, got_ids = best_candidates(logits, k, penalty, recent)
    assert got_ids == expected_ids.tolist()
    assert got_values == pytest.approx(expected_values.tolist(), rel=1e-6)
    assert sample_next_token(logits, random.Random(0), 0, penalty=penalty, recent=recent) == int(torch.argmax(whole))


def test_the_penalty_never_falls_on_the_end_of_a_turn(generator):
    """An <|end|> the prompt already holds must not make ending this turn less likely."""
    end, other = 5, 6

    class FixedLogits:  # the end of turn just ahead of another token, at every step
        def new_cache(self):
            return None

        def step(self, ids, cache):
            logits = torch.full((generator.tokenizer.vocab_size,), -10.0)
            logits[end], logits[other] = 1.0, 0.95  # penalised by 1.1, the end would lose
            return logits

    generator._decoder = FixedLogits
    cfg = GenerationConfig(temperature=0, max_new_tokens=3, repetition_penalty=1.1)
    assert list(generator.generate_ids([end, 7, end], cfg, stop_ids=frozenset({end}))) == []
    assert generator.finish_reason == "stop"
    # Any other token the prompt holds is penalised as before.
    assert list(generator.generate_ids([end, 7, end], cfg))[0] == other


class FakeTokenizer:
    """Each id is one character; lets the streamer tests spell out exact strings."""

    def __init__(self, alphabet):
        self.alphabet = alphabet

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)

    def token_byte_strings(self):
        return tuple(ch.encode("utf-8") for ch in self.alphabet)


def test_streamer_hides_stop_strings_and_partial_prefixes():
    alphabet = "abc\nUser:"
    tok = FakeTokenizer(alphabet)
    streamer = TextStreamer(tok, ("\nUser:",))
    out = ""
    for ch in "ab\nUser:":
        out += streamer.push(alphabet.index(ch))
        assert "\n" not in out  # the newline might start the stop string: held back
    assert streamer.stopped and out == "ab"


def test_streamer_releases_a_held_prefix_that_was_not_a_stop():
    alphabet = "ab\nc"
    streamer = TextStreamer(FakeTokenizer(alphabet), ("\nUser:",))
    out = "".join(streamer.push(alphabet.index(ch)) for ch in "a\nb")
    assert out == "a\nb" and not streamer.stopped


def test_streamer_waits_for_complete_utf8_characters():
    tok = train_tokenizer("bpe", ["plain ascii text only"], 300)
    ids = tok.encode("日本😀")  # characters unseen in training: several byte tokens each
    streamer = TextStreamer(tok)
    pieces = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "日本😀"


@pytest.fixture(scope="module", params=KINDS)
def any_tokenizer(request):
    return train_tokenizer(request.param, list(chunk_text(SAMPLE_TEXT, 400)), 400)


def byte_id(tok, value):
    """The id of the token that is exactly this one byte (BPE's byte alphabet, SentencePiece's <0xNN>)."""
    return tok.token_byte_strings().index(bytes([value]))


def stream_pieces(tok, parts, stops=()):
    """Push ``parts`` (text -> its ids, int -> one byte token) one id at a time; pieces shown, then the flush."""
    ids = [i for part in parts for i in ([byte_id(tok, part)] if isinstance(part, int) else tok.encode(part))]
    streamer = TextStreamer(tok, stops)
    return [streamer.push(i) for i in ids] + [streamer.flush()], streamer


# Byte tokens a model can sample in an order that is not UTF-8, and what must be shown.
INVALID_BYTE_RUNS = {
    "lone continuation byte": (["ok ", 0x80, "fine"], "ok fine"),
    "3-byte lead cut short by ASCII": (["x", 0xE6, 0x97, "yz"], "xyz"),
    "lead byte cut short by another lead": ([0xE6, 0xF0, 0x9F, 0x98, 0x80, "!"], "😀!"),
    "surrogate spelt in UTF-8": ([0xED, 0xA0, 0x80, "x"], "x"),
    "overlong slash": ([0xC0, 0xAF, "x"], "x"),
    "unfinished character at the end": (["end", 0xF0, 0x9F], "end"),
}


@pytest.mark.parametrize("case", INVALID_BYTE_RUNS, ids=list(INVALID_BYTE_RUNS))
def test_streamer_drops_bytes_that_are_not_utf8_and_keeps_the_rest(any_tokenizer, case):
    parts, expected = INVALID_BYTE_RUNS[case]
    pieces, _ = stream_pieces(any_tokenizer, parts)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == expected


def test_streamer_shows_an_emoji_only_once_its_last_byte_arrives(any_tokenizer):
    pieces, _ = stream_pieces(any_tokenizer, ["a", 0xF0, 0x9F, 0x98, 0x80, "b"])
    assert "".join(pieces) == "a😀b"
    assert "😀" in pieces[-3] + pieces[-2] and "".join(pieces[:-3]) in ("", "a")  # nothing half-shown


def test_streamer_shows_a_replacement_character_the_model_really_wrote(any_tokenizer):
    pieces, _ = stream_pieces(any_tokenizer, ["a", 0xEF, 0xBF, 0xBD, "b"])
    assert "".join(pieces) == "a\ufffdb"


def test_invalid_bytes_do_not_hide_a_stop_string(any_tokenizer):
    pieces, streamer = stream_pieces(any_tokenizer, ["hi", 0x80, "\nUs", 0xE6, "er: more"], CHAT_STOPS)
    assert streamer.stopped and "".join(pieces) == "hi"


# SentencePiece reads a literal U+2581 as its own space marker and decodes it as a space
# (a limit of the library, the same in tok.decode), so valid text here is text without it.
# Any text Python can encode as UTF-8: no lone surrogates (category Cs).
VALID_TEXT = st.text(st.characters(exclude_characters="\u2581", exclude_categories=("Cs",)), max_size=80)


@settings(max_examples=60, deadline=None)
@given(text=VALID_TEXT)
def test_streaming_valid_text_token_by_token_reproduces_it(any_tokenizer, text):
    pieces, _ = stream_pieces(any_tokenizer, [text])
    assert "".join(pieces) == text


STOP_HEAVY = st.one_of(st.sampled_from(["\nUser:", "\nAI:", "\n", "User", "AI", ":", "😀", "é"]),
                         st.text(st.characters(exclude_characters="\u2581", exclude_categories=["Cs"]), max_size=6))


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(STOP_HEAVY, max_size=12))
def test_streaming_with_stop_strings_shows_exactly_the_text_before_the_first_stop(any_tokenizer, parts):
    text = "".join(parts)
    pieces, streamer = stream_pieces(any_tokenizer, [text], CHAT_STOPS)
    cut = min((text.find(stop) for stop in CHAT_STOPS if stop in text), default=len(text))
    assert "".join(pieces) == text[:cut]
    assert streamer.stopped == (cut < len(text))


def test_the_plain_fallback_format():
    messages = [Message("system", "Be kind."), Message("user", "hi"), Message("assistant", "hello"),
                Message("user", "and you?")]
    assert render_plain(messages) == "Be kind.\nUser: hi\nAI: hello\nUser: and you?\nAI:"


def test_chat_keeps_history_and_drops_oldest_turns(generator):
    session = ChatSession(generator, GenerationConfig(max_new_tokens=8, seed=1, temperature=1.0))
    answered = 0
    for i in range(6):
        reply = "".join(session.send(f"tell me about the river and the mill number {i}"))
        answered += bool(reply.strip())
        assert generator.last_stats.prompt_tokens <= generator.prompt_budget(8)
    # The whole conversation is kept (for /save); only the prompt leaves old turns out.
    assert len(session.messages) == 2 * answered and answered >= 2
    assert any("oldest exchange" in n for n in generator.notices)  # the window is 32 tokens
    session.reset()
    assert session.messages == []


def test_chat_stop_strings_end_the_reply_where_they_start(generator):
    cfg = GenerationConfig(max_new_tokens=30, seed=4)
    messages = [Message("user", "tell me about the river")]
    full = "".join(generator.chat(messages, cfg))
    at = next(i for i in range(3, len(full) - 1) if not full[i:i + 2].isspace() and " " not in full[i:i + 2])
    stop = full[at:at + 2]
    assert "".join(generator.chat(messages, cfg, stop_strings=(stop,))) == full[:full.index(stop)]
    assert generator.last_stats.finish_reason == "stop"


def test_long_prompt_is_cut_from_the_left_with_a_notice(generator):
    list(generator.complete("word " * 200, GenerationConfig(max_new_tokens=5, seed=0)))
    assert any("start was cut" in n for n in generator.notices)


def test_empty_question_is_refused(generator):
    with pytest.raises(ValueError, match="empty"):
        generator.answer("   ", GenerationConfig())


@pytest.mark.parametrize("prompt", ["", "😀🚀", "日本語で話してください", "x" * 3])
def test_odd_prompts_generate_without_error(generator, prompt):
    text = "".join(generator.complete(prompt, GenerationConfig(max_new_tokens=10, seed=2)))
    assert isinstance(text, str)


def test_no_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one first"):
        ResponseGenerator(str(tmp_path / "nothing"))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(top_k=-5)])
def test_generation_config_validation(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_a_lone_surrogate_is_encoded_not_refused(any_tokenizer):
    """Text from a terminal that is not UTF-8 can hold one; it becomes U+FFFD, not an error."""
    ids = any_tokenizer.encode("a\ud800b")
    assert ids and "a" in any_tokenizer.decode(ids) and "b" in any_tokenizer.decode(ids)
