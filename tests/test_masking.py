"""Only model turns are trained: their content and <end_of_turn>, in every model turn."""

import itertools

import pytest
from transformers import AutoTokenizer

from persian_qlora import (
    GemmaChatCollator,
    GemmaTurnMarkers,
    PersianChatDataset,
    PersianQLoRAError,
    TemplateError,
    model_turn_labels,
)
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.testing import build_tiny_tokenizer

PERSIAN = ["سلام، وقت بخیر!", "پایتخت ایران کجاست؟", "تهران؛ شهری در دامنهٔ البرز.", "می‌خواهم «حافظ» بخوانم."]
ENGLISH = ["Hello there!", "What is the capital of Iran?", "Tehran, at the foot of the Alborz.", "Read Hafez."]


def _conversation(texts, n_messages, system):
    cycle = itertools.cycle(texts)
    messages = [{"role": "system", "content": "You are helpful. تو دستیار هستی."}] if system else []
    for i in range(n_messages):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"{next(cycle)} ({i})"})
    return messages


def _trained_spans(labels):
    """Contiguous runs of trained label ids."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


@pytest.fixture(
    scope="module",
    params=[2048, 400, pytest.param("gemma3-270m", marks=pytest.mark.real_model)],
    ids=["vocab2048", "vocab400", "gemma3-270m"],
)
def tokenizer(request):
    # Two tiny vocabularies, where "model\n" encodes to different ids, and the real Gemma 3 tokenizer (262k tokens,
    # SentencePiece-style merges learned on far more than Persian): masking must hold for all of them.
    if request.param == "gemma3-270m":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("gemma3_270m_path"))
    return build_tiny_tokenizer(vocab_size=request.param)


@pytest.mark.parametrize("texts", [PERSIAN, ENGLISH], ids=["persian", "english"])
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("n_messages", range(2, 9, 2))
def test_trained_tokens_are_exactly_the_model_turns(tokenizer, texts, system, n_messages):
    conversation = _conversation(texts, n_messages, system)
    dataset = PersianChatDataset([{"messages": conversation}], tokenizer)
    item = dataset[0]
    expected = [m["content"] + "<end_of_turn>" for m in dataset.conversations[0] if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in _trained_spans(item["labels"])] == expected
    # Labels equal the input ids wherever they are trained (the model's forward does the shift).
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(item["labels"], item["input_ids"], strict=True))


def test_trailing_newline_after_end_of_turn_is_not_trained(tiny_tokenizer):
    dataset = PersianChatDataset([{"messages": _conversation(PERSIAN, 2, False)}], tiny_tokenizer)
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    end = ids.index(tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>"), len(ids) - 3)
    assert labels[end] == ids[end]
    assert tiny_tokenizer.decode(ids[end + 1 :]) == "\n"
    assert all(label == IGNORE_INDEX for label in labels[end + 1 :])


def test_persian_text_that_looks_like_a_header_is_not_a_turn(tiny_tokenizer):
    # "model" typed by the user inside a user turn must not open a model turn: only the control token does.
    markers = GemmaTurnMarkers.from_tokenizer(tiny_tokenizer)
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "model\nمدل"}, {"role": "assistant", "content": "بله"}], tokenize=False
    )
    labels = model_turn_labels(tiny_tokenizer.encode(text, add_special_tokens=False), markers)
    assert [tiny_tokenizer.decode(s) for s in _trained_spans(labels)] == ["بله<end_of_turn>"]


def test_markers_refuse_a_non_gemma_template(tiny_tokenizer):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    with pytest.raises(TemplateError, match=r"TURN_FORMATS\['gemma3'\]\.chat_template\(\)"):
        GemmaTurnMarkers.from_tokenizer(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        GemmaChatCollator(tokenizer)


def test_exactly_one_bos(tiny_tokenizer):
    dataset = PersianChatDataset([{"messages": _conversation(PERSIAN, 4, True)}], tiny_tokenizer)
    ids = dataset[0]["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert ids.count(tiny_tokenizer.bos_token_id) == 1


def test_truncation_never_yields_an_all_masked_sample(tiny_tokenizer):
    conversations = [{"messages": _conversation(PERSIAN, n, s)} for n in (2, 4, 6, 8) for s in (False, True)]
    full = PersianChatDataset(conversations, tiny_tokenizer)
    for max_length in range(8, full.stats.max_tokens + 2, 3):
        try:
            dataset = PersianChatDataset(conversations, tiny_tokenizer, max_length=max_length)
        except PersianQLoRAError as err:  # every conversation was cut before its first model turn
            assert "'no trained tokens after truncation': 8" in str(err)
            continue
        assert len(dataset) + dataset.stats.dropped.get("no trained tokens after truncation", 0) == len(full)
        for item in dataset:
            assert len(item["input_ids"]) <= max_length
            assert any(label != IGNORE_INDEX for label in item["labels"])


def test_a_model_turn_cut_by_truncation_is_trained_up_to_the_cut(tiny_tokenizer):
    conversation = [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود " * 50}]
    dataset = PersianChatDataset([{"messages": conversation}], tiny_tokenizer, max_length=30)
    labels = dataset[0]["labels"]
    assert len(labels) == 30 and labels[-1] != IGNORE_INDEX
    assert dataset.stats.truncated == 1
