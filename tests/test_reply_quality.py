"""The reply-quality measure (scripts/reply_quality.py): its numbers on replies whose answer is known."""
import importlib.util
import sys

import pytest

from engine.data.chat_format import Message

from conftest import ROOT

pytest.importorskip("wordfreq", reason="the reply measure needs wordfreq (requirements-bench.txt)")
spec = importlib.util.spec_from_file_location("reply_quality", ROOT / "scripts" / "reply_quality.py")
rq = importlib.util.module_from_spec(spec)
sys.modules["reply_quality"] = rq  # dataclasses look their module up there
spec.loader.exec_module(rq)


def test_words_are_letters_with_inner_apostrophes_and_numbers_are_not_words():
    assert rq.words("I don't know, 42 times! Rock'n'roll.") == ["i", "don't", "know", "times", "rock'n'roll"]


def test_english_share_counts_gibberish_words_against_the_reply():
    assert rq.english_share(["Haha, that's really cool."]) == 1.0
    assert rq.english_share(["Pincience."]) == 0.0
    assert rq.english_share(["the cat Proina sat"]) == 0.75
    assert rq.english_share(["", "12 34"]) == 0.0


def test_distinct_2_is_one_without_repeats_and_falls_with_them():
    assert rq.distinct_2(["a b c", "d e f"]) == 1.0
    assert rq.distinct_2(["I like it", "I like it"]) == 0.5  # 2 distinct of 4 bigrams
    assert rq.distinct_2(["one"]) == 0.0


def test_summarize_adds_up_the_replies():
    replies = [rq.Reply("Hi", "Hello there friend", True, False), rq.Reply("Yo", "Pincience", False, True)]
    q = rq.summarize(replies, held_out_bpb=2.5, left_out=1)
    assert (q.replies, q.turn_end, q.role_leaks, q.mean_words) == (2, 0.5, 0.5, 2.0)
    assert q.english_words == 0.75 and q.distinct_2 == 1.0 and q.held_out_bpb == 2.5 and q.left_out_openings == 1


def test_openings_found_in_the_training_data_are_left_out():
    conversations = [[Message("user", "  how was YOUR weekend? "), Message("assistant", "Fine.")]]
    kept, left_out = rq.fresh_openings(conversations)
    assert left_out == 1 and "How was your weekend?" not in kept and len(kept) == len(rq.OPENINGS) - 1


def test_a_tiny_chat_model_is_measured_end_to_end(trained_copy):
    """The measure runs on a real folder: every opening gets a reply and the numbers are shares."""
    from trainer import Trainer

    folder = trained_copy("bpe", 1)
    convs = [[Message("user", "Hi!"), Message("assistant", "Hello, nice to meet you.")]] * 3 + \
        [[Message("user", "How are you?"), Message("assistant", "Very well, thanks.")]] * 3
    from engine.data.conversations import ConversationSource

    Trainer(str(folder)).train_conversations(ConversationSource("tiny", convs), 1)
    q, replies = rq.measure(folder, convs)
    assert q.replies == len(replies) == len(rq.OPENINGS)
    assert all(0.0 <= x <= 1.0 for x in (q.english_words, q.turn_end, q.role_leaks, q.distinct_2))
    assert q.held_out_bpb is not None and q.held_out_bpb > 0
