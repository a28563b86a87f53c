"""perplexity: exp of the mean NLL of exactly the model-turn tokens, whatever the batching, plain or peft model."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from persian_qlora import PersianChatDataset, perplexity
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.modeling import build_lora_model


@pytest.fixture(scope="module")
def setup(tiny_gemma3_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_path, dtype=torch.float32).eval()
    dataset = PersianChatDataset.bundled(tokenizer, split="test", max_length=256)
    return model, tokenizer, [dataset[i] for i in range(7)]


def _one_by_one(model, items):
    """The definition, conversation by conversation: full logits, next-token NLL where the label is trained."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            ids, labels = torch.tensor([item["input_ids"]]), torch.tensor(item["labels"])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = labels[1:]
            trained = targets != IGNORE_INDEX
            nll += float(F.cross_entropy(logits[trained], targets[trained], reduction="sum"))
            count += int(trained.sum())
    return math.exp(nll / count)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_is_the_model_turn_nll_whatever_the_batch(setup, batch_size):
    model, tokenizer, items = setup
    expected = _one_by_one(model, items)
    assert perplexity(model, tokenizer, items, batch_size=batch_size) == pytest.approx(expected, rel=1e-4)


def test_a_peft_model_is_scored_through_its_adapter(setup, tiny_gemma3_path):
    model, tokenizer, items = setup
    peft_model = build_lora_model(tiny_gemma3_path, gradient_checkpointing=False)
    assert perplexity(peft_model, tokenizer, items) == pytest.approx(perplexity(model, tokenizer, items), rel=1e-5)
    generator = torch.Generator().manual_seed(0)  # not the global RNG: other tests leave it anywhere
    with torch.no_grad():  # a non-zero B: the adapter now changes the model, and so its perplexity
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=generator)
    changed = perplexity(peft_model, tokenizer, items)
    assert changed == pytest.approx(_one_by_one(peft_model, items), rel=1e-4)
    # The random tiny model is near-uniform (perplexity ~ its 2,048 tokens), so any adapter moves it little: a few
    # 1e-4 relative here, against ~1e-7 of float noise when the adapter is ignored.
    assert abs(changed - perplexity(model, tokenizer, items)) > 1e-5 * changed


def test_the_training_mode_is_restored(setup):
    model, tokenizer, items = setup
    model.train()
    perplexity(model, tokenizer, items[:2])
    assert model.training
    model.eval()
