"""The bad-input corpus in tests/data/bad/: every kind gets a clear error naming file and line, a counted skip,
or a documented repair. Nothing reaches the tokenizer malformed. cases.json holds the expected behaviour."""

import json
from pathlib import Path

import pytest

from persian_qlora import InvalidRecordError, PersianChatDataset, PersianQLoRAError

BAD = Path(__file__).parent / "data" / "bad"
CASES = json.loads((BAD / "cases.json").read_text(encoding="utf-8"))
MAX_LENGTH = 512


def test_the_corpus_covers_at_least_thirty_kinds():
    assert len({case["kind"] for case in CASES}) >= 30
    assert {p.name for p in BAD.iterdir()} - {"cases.json"} == {case["file"] for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[case["file"] for case in CASES])
def test_bad_input_behaves_as_documented(tiny_tokenizer, case):
    path = BAD / case["file"]
    load = lambda **kw: PersianChatDataset(path, tiny_tokenizer, max_length=MAX_LENGTH, **kw)  # noqa: E731

    if "raise" in case:
        expected = case["raise"]
        with pytest.raises(InvalidRecordError) as caught:
            load()
        assert caught.value.reason == expected["reason"]
        assert str(caught.value).startswith(f"{case['file']} {expected['where']}")
        assert expected["contains"] in str(caught.value)
        skipped = load(on_error="skip")
        assert len(skipped) == case["skip"]["kept"]
        assert skipped.stats.skipped_invalid == case["skip"]["skipped"]
    elif "fails" in case:  # the whole file is unusable: an error even when skipping records
        for on_error in ("raise", "skip"):
            with pytest.raises(PersianQLoRAError, match=case["fails"].replace("(", r"\(").replace(")", r"\)")):
                load(on_error=on_error)
    else:
        expected = case["accept"]
        dataset = load()
        assert len(dataset) == expected["kept"]
        assert dataset.stats.dropped == expected.get("dropped", {})
        assert dataset.stats.truncated == expected.get("truncated", 0)
        for name, count in expected.get("cleaning", {}).items():
            assert getattr(dataset.stats.cleaning, name) == count, name
        for conversation in dataset.conversations:  # what is trained on is clean text
            for message in conversation:
                text = message["content"]
                assert not any(ord(ch) < 32 and ch not in "\n\t" for ch in text), text
                assert not any(ch in text for ch in "\u200e\u200f\u202b\u202c\u2067\u2069\ufeff\r")
                assert "ي" not in text and "ك" not in text
        for item in dataset:
            assert any(label != -100 for label in item["labels"])
