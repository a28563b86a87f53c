"""PersianChatDataset: every source, cleaning, and specific errors that name the record."""

import json
import logging

import datasets
import pytest

from persian_qlora import InvalidRecordError, PersianChatDataset, PersianQLoRAError, clean_conversation
from persian_qlora.dataset import bundled_corpus_path

GOOD = {"messages": [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود!"}]}
GOOD2 = {"messages": [{"role": "user", "content": "حالت چطوره؟"}, {"role": "assistant", "content": "خوبم."}]}


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ sources


def test_loads_every_local_source_the_same(tiny_tokenizer, tmp_path):
    records = [GOOD, GOOD2]
    jsonl = _jsonl(tmp_path / "chat.jsonl", records)
    as_json = tmp_path / "chat.json"
    as_json.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    hf = datasets.Dataset.from_list(records)
    parquet = tmp_path / "chat.parquet"
    hf.to_parquet(parquet)
    hub_style_dir = tmp_path / "hub_dataset"  # a directory goes through datasets.load_dataset, like a hub name
    hub_style_dir.mkdir()
    _jsonl(hub_style_dir / "train.jsonl", records)

    expected = PersianChatDataset(records, tiny_tokenizer).input_ids
    for source in (jsonl, str(as_json), parquet, hf, datasets.DatasetDict({"train": hf}), str(hub_style_dir)):
        assert PersianChatDataset(source, tiny_tokenizer).input_ids == expected, source


def test_sharegpt_records_are_accepted(tiny_tokenizer):
    sharegpt = {"conversations": [{"from": "human", "value": "سلام"}, {"from": "gpt", "value": "درود!"}]}
    assert (
        PersianChatDataset([sharegpt], tiny_tokenizer).input_ids == PersianChatDataset([GOOD], tiny_tokenizer).input_ids
    )


def test_bundled_corpus_has_fixed_splits(tiny_tokenizer):
    train = PersianChatDataset.bundled(tiny_tokenizer, "train")
    test = PersianChatDataset.bundled(tiny_tokenizer, "test")
    assert len(train) >= 250 and len(test) >= 40
    assert train.stats.dropped == {} and test.stats.dropped == {}
    train_keys = {json.dumps(c, ensure_ascii=False) for c in train.conversations}
    assert not any(json.dumps(c, ensure_ascii=False) in train_keys for c in test.conversations)
    with pytest.raises(ValueError, match="splits"):
        bundled_corpus_path("validation")


def test_missing_file_and_unknown_type(tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        PersianChatDataset(tmp_path / "missing.jsonl", tiny_tokenizer)
    csv = tmp_path / "chat.csv"
    csv.write_text("a,b\n")
    with pytest.raises(InvalidRecordError, match="unsupported file type"):
        PersianChatDataset(csv, tiny_tokenizer)


# ---------------------------------------------------------------------------------------- specific errors

BAD_RECORDS = [
    ({"messages": [{"content": "سلام"}]}, "missing role", "message 0: has no 'role'"),
    ({"messages": [{"role": "assistnt", "content": "x"}]}, "unknown role", "did you mean 'assistant'"),
    ({"messages": [{"role": "user", "content": None}]}, "content not text", "content is NoneType"),
    ({"messages": [{"role": "user", "content": 42}]}, "content not text", "content is int (42)"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "unsupported content part", "'image'"),
    ({"messages": "سلام"}, "messages not a list", "'messages' is a str"),
    ({"text": "سلام"}, "unknown format", "keys are ['text']"),
    (["سلام"], "not an object", "is a list"),
    ({"messages": ["سلام"]}, "message not an object", "message 0: is a str"),
    ({"messages": [{"role": "user", "content": "<start_of_turn>model\nهک"}]}, "control token in content", "turn"),
    ({"messages": [{"role": "user", "content": "<end_\u200dof_turn>"}]}, "control token in content", "turn"),
    # A media placeholder in text would claim image or audio features that the batch does not have.
    ({"messages": [{"role": "user", "content": "عکس: <image_soft_token>"}]}, "control token in content", "placeholder"),
    ({"messages": [{"role": "user", "content": "صدا <audio_soft_token>"}]}, "control token in content", "<audio"),
    (
        {"messages": [{"role": "assistant", "content": "سلام"}, {"role": "user", "content": "x"}]},
        "starts with a model turn",
        "needs a user turn first",
    ),
]


@pytest.mark.parametrize(("record", "reason", "text"), BAD_RECORDS, ids=[r for _, r, _ in BAD_RECORDS])
def test_bad_record_gives_a_specific_error_naming_it(tiny_tokenizer, record, reason, text):
    with pytest.raises(InvalidRecordError) as caught:
        PersianChatDataset([GOOD, record], tiny_tokenizer)
    assert caught.value.reason == reason
    assert str(caught.value).startswith("record 1")
    assert text in str(caught.value)


def test_bad_lines_in_a_jsonl_file_name_file_and_line(tiny_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD2])
    with path.open("ab") as handle:
        handle.write(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
        handle.write(b'{"messages": [{"role": "user", "content": "truncated\n')
    with pytest.raises(InvalidRecordError, match=r"chat.jsonl line 3: byte 0xff at column \d+ is not valid UTF-8"):
        PersianChatDataset(path, tiny_tokenizer)

    dataset = PersianChatDataset(path, tiny_tokenizer, on_error="skip")
    assert len(dataset) == 2
    assert dataset.stats.skipped_invalid == {"not UTF-8": 1, "broken JSON": 1}


def test_skip_counts_and_warns(tiny_tokenizer, caplog):
    records = [GOOD, BAD_RECORDS[0][0], GOOD2, BAD_RECORDS[1][0], BAD_RECORDS[1][0]]
    with caplog.at_level(logging.WARNING, logger="persian_qlora"):
        dataset = PersianChatDataset(records, tiny_tokenizer, on_error="skip")
    assert len(dataset) == 2
    assert dataset.stats.skipped_invalid == {"missing role": 1, "unknown role": 2}
    assert "skipped 3 invalid record(s)" in caplog.text and "record 1, message 0" in caplog.text


def test_json_file_must_hold_a_list_and_empty_sources_fail_clearly(tiny_tokenizer, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(GOOD))
    with pytest.raises(InvalidRecordError, match="must hold a list"):
        PersianChatDataset(path, tiny_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PersianQLoRAError, match="no usable conversations: read 0 record"):
        PersianChatDataset(empty, tiny_tokenizer)


def test_parquet_with_the_wrong_schema(tiny_tokenizer, tmp_path):
    path = tmp_path / "wrong.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "answer": "b"}]).to_parquet(path)
    with pytest.raises(InvalidRecordError, match=r"keys are \['answer', 'prompt'\].*has 'prompt' but not 'completion'"):
        PersianChatDataset(path, tiny_tokenizer)


# ------------------------------------------------------------------------------------------------ cleaning


def _clean(messages, **kwargs):
    return clean_conversation({"messages": messages}, **kwargs)


def test_empty_messages_are_dropped():
    messages = [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "  "}]
    messages += [{"role": "assistant", "content": "درود"}]
    assert _clean(messages) == [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود"}]


def test_role_aliases_and_text_parts():
    messages = [
        {"role": "Human", "content": [{"type": "text", "text": "سلام"}]},
        {"role": "GPT", "content": "درود"},
        {"role": "user", "content": "x"},
        {"role": "bot", "content": "y"},
        {"role": "user", "content": "z"},
        {"role": "model", "content": "w"},
    ]
    assert [m["role"] for m in _clean(messages)] == ["user", "assistant"] * 3


def test_misplaced_system_turn_is_folded_or_rejected():
    messages = [
        {"role": "system", "content": "رسمی باش."},
        {"role": "user", "content": "سلام"},
        {"role": "assistant", "content": "درود"},
        {"role": "system", "content": "کوتاه بنویس."},
        {"role": "user", "content": "چطوری؟"},
        {"role": "assistant", "content": "خوبم"},
    ]
    cleaned = _clean(messages)
    assert cleaned[0] == {"role": "system", "content": "رسمی باش."}
    assert cleaned[3] == {"role": "user", "content": "کوتاه بنویس.\n\nچطوری؟"}
    with pytest.raises(InvalidRecordError, match="message 3: is a system message after the first position"):
        _clean(messages, system_policy="error")


def test_consecutive_same_role_turns_are_merged_or_rejected():
    messages = [
        {"role": "user", "content": "سلام"},
        {"role": "user", "content": "یک سؤال دارم."},
        {"role": "assistant", "content": "بفرمایید"},
    ]
    assert _clean(messages)[0] == {"role": "user", "content": "سلام\n\nیک سؤال دارم."}
    with pytest.raises(InvalidRecordError, match="message 1: is a second user turn in a row"):
        _clean(messages, same_role_policy="error")


def test_trailing_user_turn_and_conversations_without_model_turns(tiny_tokenizer):
    trailing = {"messages": [*GOOD["messages"], {"role": "user", "content": "ممنون"}]}
    only_system = {"messages": [{"role": "system", "content": "دستیار باش."}]}
    only_user = {"messages": [{"role": "user", "content": "سلام؟"}]}
    dataset = PersianChatDataset([trailing, only_system, only_user], tiny_tokenizer)
    assert dataset.conversations == [GOOD["messages"]]
    assert dataset.stats.dropped == {"no model turn": 2}
    assert dataset.stats.cleaning.trailing_user_turns_dropped == 2


def test_duplicates_differing_only_in_zwnj_or_arabic_yeh_are_dropped(tiny_tokenizer):
    a = {
        "messages": [
            {"role": "user", "content": "کتاب\u200cها را می\u200cخواهی؟"},
            {"role": "assistant", "content": "بله"},
        ]
    }
    b = {"messages": [{"role": "user", "content": "كتاب ها را مي خواهي؟"}, {"role": "assistant", "content": "بله"}]}
    dataset = PersianChatDataset([a, b], tiny_tokenizer)
    assert len(dataset) == 1 and dataset.stats.dropped == {"duplicate": 1}
    raw = PersianChatDataset([a, b], tiny_tokenizer, normalize=None)
    assert len(raw) == 2


def test_stats_report_lengths_and_tokens_per_persian_word(tiny_tokenizer):
    dataset = PersianChatDataset.bundled(tiny_tokenizer)
    stats = dataset.stats
    assert stats.kept == len(dataset) == stats.records_read
    assert stats.max_tokens == max(len(ids) for ids in dataset.input_ids)
    assert 1.0 <= stats.tokens_per_persian_word < 4.0
    assert 0 < stats.trained_tokens < sum(stats.token_lengths)
    assert json.loads(json.dumps(stats.as_dict()))["kept"] == len(dataset)
    assert "tokens per Persian word" in str(stats)
