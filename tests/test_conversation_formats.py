"""Conversation files: the three forms, JSONL / JSON / Parquet, bad records named, the built-in set."""
import json

import pytest

from engine.data.chat_format import Message
from engine.data.conversation_formats import ConversationForm
from engine.data.conversations import (
    BUILTIN_CONVERSATIONS_NAME,
    builtin_conversations,
    open_conversation_files,
    open_conversations,
)

EXCHANGES = [("Hi there!", "Hello, how are you?"), ("What do you cook on Sundays?", "Usually a big pot of soup."),
             ("Any plans for the weekend?", "A long walk by the river.")]
EXPECTED = [[Message("system", "Be kind."), Message("user", q), Message("assistant", a)] for q, a in EXCHANGES[:1]] \
    + [[Message("user", q), Message("assistant", a)] for q, a in EXCHANGES[1:]]


def openai_record(system, q, a):
    return {"messages": ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def sharegpt_record(system, q, a):
    return {"conversations": ([{"from": "system", "value": system}] if system else [])
            + [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def alpaca_record(system, q, a):
    return {"instruction": q, "input": "", "output": a, **({"system": system} if system else {})}


FORMS = {ConversationForm.OPENAI: openai_record, ConversationForm.SHAREGPT: sharegpt_record,
         ConversationForm.ALPACA: alpaca_record}


def records(form):
    return [FORMS[form]("Be kind." if i == 0 else "", q, a) for i, (q, a) in enumerate(EXCHANGES)]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_each_form_reads_to_the_same_messages(tmp_path, form, layout):
    path = tmp_path / f"chats.{layout}"
    data = records(form)
    path.write_text("\n".join(json.dumps(r) for r in data) if layout == "jsonl" else json.dumps(data))
    source = open_conversations(str(path))
    assert source.conversations == EXPECTED and source.forms == (form,) and source.skipped == 0


def test_parquet_reads_to_the_same_messages(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet is an optional extra (requirements-parquet.txt)")
    import pyarrow.parquet as pq

    for form in FORMS:
        path = tmp_path / f"{form.name}.parquet"
        pq.write_table(pa.Table.from_pylist(records(form)), path)
        source = open_conversations(str(path))
        assert source.conversations == EXPECTED and source.forms == (form,)


def test_a_file_that_is_not_parquet_is_one_clear_line(tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet is an optional extra (requirements-parquet.txt)")
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(ValueError, match="cannot read .* as Parquet") as info:
        open_conversations(str(path))
    assert "\n" not in str(info.value)


BAD = {  # form: (a bad record, what the message names)
    ConversationForm.OPENAI: ('{"messages": [{"role": "wizard", "content": "hi"}]}', "unknown role 'wizard'"),
    ConversationForm.SHAREGPT: ('{"conversations": [{"from": "narrator", "value": "hi"}]}', "is from 'narrator'"),
    ConversationForm.ALPACA: ('{"instruction": "Say hi", "input": "", "output": ""}', "the output is empty"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_bad_record_in_each_form_is_named_and_skipped(tmp_path, form):
    good = [json.dumps(r) for r in records(form)]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([good[0], good[1], BAD[form][0], good[2]]) + "\n")
    source = open_conversations(str(path))
    assert source.conversations == EXPECTED and source.skipped == 1
    assert source.problems[0].startswith("chats.jsonl:3: ") and BAD[form][1] in source.problems[0]
    assert any("1 bad line(s) skipped; training on the other 3" in n for n in source.notes)


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}', "empty content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant reply"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "no assistant reply"),
    ('{"text": "hello"}', '"messages" list'),
    ('[{"role": "user"}]', 'needs "role" and "content"'),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}', '"messages" list'),
])
def test_every_bad_line_is_named_and_skipped(tmp_path, line, message):
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([good, good.replace("hi", "hey"), line, good.replace("hi", "yo")]) + "\n")
    source = open_conversations(str(path))
    assert len(source.conversations) == 3 and source.skipped == 1
    assert source.problems[0].startswith("chats.jsonl:3: ") and message in source.problems[0]


def test_turns_in_a_row_are_joined_and_an_assistant_opening_is_left_out(tmp_path):
    path = tmp_path / "export.jsonl"
    rows = [{"conversations": [{"from": "gpt", "value": "Welcome!"}, {"from": "human", "value": "hey"},
                               {"from": "human", "value": "you there?"}, {"from": "gpt", "value": "Yes."}]}]
    path.write_text(json.dumps(rows[0]) + "\n")
    source = open_conversations(str(path))
    assert source.conversations == [[Message("user", "hey\nyou there?"), Message("assistant", "Yes.")]]
    assert source.reading.merged == 1 and source.reading.dropped_openings == 1
    assert any("joined to the one before" in n for n in source.notes)
    assert any("opened with the assistant" in n for n in source.notes)


def test_a_folder_of_several_forms_reads_each_file_in_its_own(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records(ConversationForm.SHAREGPT)))
    (tmp_path / "b.json").write_text(json.dumps(records(ConversationForm.ALPACA)[1:]))
    source = open_conversation_files(str(tmp_path))
    assert source.conversations == EXPECTED  # the Alpaca file repeats two conversations: kept once
    assert set(source.forms) == {ConversationForm.SHAREGPT, ConversationForm.ALPACA} and source.duplicates == 2


def test_a_file_that_is_mostly_not_conversations_is_refused(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    + "just some text\n" * 5)
    with pytest.raises(ValueError, match="only 1 of 6 lines are valid conversations"):
        open_conversations(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable conversation"):
        open_conversations(str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError):
        open_conversations(str(tmp_path / "missing.jsonl"))


def test_the_builtin_set_is_real_dialogue_and_needs_no_network():
    """Read from the installed package (no network is reachable here anyway), the same on every call."""
    source = builtin_conversations()
    assert source.name == BUILTIN_CONVERSATIONS_NAME and "MIT" in source.citation
    assert len(source.conversations) > 4000 and source.n_bytes > 10_000_000
    assert all(c[0].role == "user" and c[-1].role == "assistant" for c in source.conversations)
    assert builtin_conversations().content_hash() == source.content_hash()


def test_a_file_in_no_known_form_says_which_forms_it_could_be(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"prompt": "hi", "completion": "yo"}\n' * 3)
    with pytest.raises(ValueError, match="the fields completion, prompt; expected .*ShareGPT.*Alpaca"):
        open_conversations(str(path))
