import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from persian_qlora import GemmaChatCollator, PersianChatDataset
from persian_qlora.masking import IGNORE_INDEX

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود!"}]},
    {
        "messages": [
            {"role": "system", "content": "کوتاه پاسخ بده."},
            {"role": "user", "content": "پایتخت فرانسه کجاست؟"},
            {"role": "assistant", "content": "پاریس."},
            {"role": "user", "content": "و آلمان؟"},
            {"role": "assistant", "content": "برلین."},
        ]
    },
]


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer):
    return PersianChatDataset(CONVERSATIONS, tiny_tokenizer)


def test_pads_right_with_attention_mask_and_ignored_labels(tiny_tokenizer, dataset):
    tiny_tokenizer.padding_side = "left"  # the generation setting must not leak into training batches
    batch = GemmaChatCollator(tiny_tokenizer)([dataset[0], dataset[1]])
    short, long = len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])
    assert batch["input_ids"].shape == (2, long)
    assert batch["input_ids"][0, :short].tolist() == dataset[0]["input_ids"]
    assert (batch["input_ids"][0, short:] == tiny_tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (long - short)
    assert batch["labels"][0, :short].tolist() == dataset[0]["labels"]
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert "token_type_ids" not in batch


def test_labels_are_computed_when_features_carry_only_input_ids(tiny_tokenizer, dataset):
    collator = GemmaChatCollator(tiny_tokenizer)
    with_labels = collator([dataset[1]])
    without = collator([{"input_ids": dataset[1]["input_ids"]}])
    assert torch.equal(with_labels["labels"], without["labels"])


@pytest.mark.parametrize("multiple", [8, 64])
def test_pad_to_multiple_of(tiny_tokenizer, dataset, multiple):
    batch = GemmaChatCollator(tiny_tokenizer, pad_to_multiple_of=multiple)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[1] % multiple == 0
    assert batch["input_ids"].shape[1] - len(dataset[1]["input_ids"]) < multiple


def test_rejects_bad_input(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty batch"):
        GemmaChatCollator(tiny_tokenizer)([])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        GemmaChatCollator(tiny_tokenizer, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="2 labels for 3 input_ids"):
        GemmaChatCollator(tiny_tokenizer)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])


def test_token_type_ids_follow_the_model(tiny_gemma3_path, tiny_gemma3_vision_path, dataset):
    text_model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_path)
    vision_model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_vision_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_vision_path)
    assert not GemmaChatCollator.for_model(tokenizer, text_model).return_token_type_ids
    collator = GemmaChatCollator.for_model(tokenizer, vision_model)
    batch = collator([dataset[0], dataset[1]])
    assert torch.equal(batch["token_type_ids"], torch.zeros_like(batch["input_ids"]))
    vision_model.train()
    loss = vision_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_batch_loss_matches_per_example_loss(tiny_gemma3_path, dataset):
    """Padding changes nothing: the padded batch's token-mean loss equals the one computed example by example."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_path, attn_implementation="eager").eval()
    collator = GemmaChatCollator(tokenizer, pad_to_multiple_of=16)
    with torch.no_grad():
        batch_loss = model(**collator([dataset[0], dataset[1]])).loss
        losses, counts = [], []
        for item in (dataset[0], dataset[1]):
            single = collator([item])
            losses.append(model(**single).loss)
            counts.append((single["labels"][:, 1:] != IGNORE_INDEX).sum())
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(batch_loss, expected, rtol=1e-5, atol=1e-5)
