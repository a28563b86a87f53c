"""Batched generation: left padding, stop tokens, order, equality with one-by-one greedy decoding."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from persian_qlora import PersianChatDataset
from persian_qlora.generation import evaluation_pairs, generate, stop_token_ids


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_gemma3_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_gemma3_path)


@pytest.fixture(scope="module")
def prompts(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompts, _ = evaluation_pairs(PersianChatDataset.bundled(tokenizer, "test").conversations[:6])
    return prompts


def test_evaluation_pairs_split_at_the_last_model_turn():
    conversation = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert evaluation_pairs([conversation]) == ([conversation[:3]], ["d"])
    with pytest.raises(ValueError, match="conversation 0 has no model turn"):
        evaluation_pairs([[{"role": "user", "content": "a"}]])


def test_batched_greedy_equals_one_by_one(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    single = [generate(model, tokenizer, [p], max_new_tokens=12).texts[0] for p in prompts]
    assert batched.texts == single
    assert all(batched.texts) and batched.tokens_per_second > 0 and batched.memory["device"] == "cpu"


class _ForceAfter(LogitsProcessor):
    """Forces ``token`` once ``steps`` tokens have been generated."""

    def __init__(self, prompt_width, steps, token):
        self.start, self.steps, self.token = prompt_width, steps, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.start >= self.steps:
            scores[:, :] = -float("inf")
            scores[:, self.token] = 0
        return scores


def test_generation_stops_at_end_of_turn(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in stop_token_ids(tokenizer) and tokenizer.eos_token_id in stop_token_ids(tokenizer)
    width = len(tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, return_dict=True)["input_ids"])
    forced = LogitsProcessorList([_ForceAfter(width, 3, end_of_turn)])
    result = generate(model, tokenizer, prompts[:1], max_new_tokens=20, logits_processor=forced)
    assert result.new_tokens == [4]  # three tokens, then <end_of_turn>, then nothing more
    assert result.ended_turn == [True]
    assert "<end_of_turn>" not in result.texts[0] and "end_of_turn" not in result.texts[0]


def test_a_reply_cut_at_the_token_limit_did_not_end_its_turn(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    word = tokenizer.convert_tokens_to_ids("<0x41>")  # never a stop token
    width = len(tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, return_dict=True)["input_ids"])
    forced = LogitsProcessorList([_ForceAfter(width, 0, word)])
    result = generate(model, tokenizer, prompts[:1], max_new_tokens=5, logits_processor=forced)
    assert result.new_tokens == [5] and result.ended_turn == [False]
