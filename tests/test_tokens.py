"""A base model learns to end its turn: the <end_of_turn> row is trained when it is not distinct, and tokens no
fine-tune trains are never generated."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from persian_qlora import GemmaChatCollator, PersianChatDataset
from persian_qlora.families import GEMMA3_TURNS
from persian_qlora.generation import evaluation_pairs, generate, stop_token_ids
from persian_qlora.modeling import LoraSettings, build_lora_model, build_qlora_model
from persian_qlora.testing import build_tiny_gemma, build_tiny_tokenizer, plant_turn_end_copies
from persian_qlora.tokens import indistinct_tokens, untrained_token_ids
from persian_qlora.training import TrainConfig, make_trainer

COPIES = range(1500, 1600)  # ordinary tokens no reply in the bundled corpus ends with
TURN_END = GEMMA3_TURNS.end_of_turn  # the tiny Gemma 3 these tests plant


@pytest.fixture(scope="module")
def planted_path(tmp_path_factory):
    """A tiny Gemma 3 whose <end_of_turn> row has 100 near-copies, as a pretrained Gemma's has 6,242 <unused*>."""
    return plant_turn_end_copies(build_tiny_gemma(tmp_path_factory.mktemp("planted"), "gemma3", seed=1), COPIES)


def test_untrained_tokens_are_the_reserve_and_the_placeholders():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<unused0>", "<unused1>"], special_tokens=True)
    vocab = tokenizer.get_vocab()
    ids = untrained_token_ids(tokenizer)
    names = {t for t, i in vocab.items() if i in ids}
    assert {"<unused0>", "<unused1>", "<pad>", "<bos>", "<image_soft_token>", "<start_of_image>"} <= names
    assert not names & {"<eos>", "<end_of_turn>", "<start_of_turn>"}
    assert all(not t.isalnum() for t in names)  # no ordinary word is ever suppressed


def test_a_planted_turn_end_row_is_found_and_a_random_one_is_not(planted_path, tiny_gemma3_path):
    for path, expected in ((planted_path, True), (tiny_gemma3_path, False)):
        tokenizer = AutoTokenizer.from_pretrained(path)
        turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
        table = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
        assert indistinct_tokens(table, [turn_end]) == ([turn_end] if expected else [])


def _turn_end_accuracy(model, tokenizer, features):
    """The share of trained <end_of_turn> positions where the model's top token is <end_of_turn>."""
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    batch = GemmaChatCollator(tokenizer)(features)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    at_turn_end = targets == turn_end
    return (logits[:, :-1].argmax(-1)[at_turn_end] == turn_end).float().mean().item()


@pytest.mark.parametrize("train_turn_end", [True, False], ids=["default", "without"])
def test_the_default_recipe_learns_to_end_its_turn_despite_near_copies(planted_path, tmp_path, train_turn_end):
    tokenizer = AutoTokenizer.from_pretrained(planted_path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=4000)
    features = [f for f in (dataset[i] for i in range(len(dataset))) if len(f["input_ids"]) <= 160][:8]
    torch.manual_seed(0)
    model = build_lora_model(planted_path, lora=LoraSettings(train_turn_end=train_turn_end))
    trained_rows = model.peft_config["default"].trainable_token_indices
    assert (trained_rows is not None) == train_turn_end
    config = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=30,
        learning_rate=2e-2,
        warmup_steps=0,
        gradient_accumulation_steps=1,
        extra={"save_strategy": "no"},
    )
    make_trainer(model, tokenizer, features, config=config).train()
    accuracy = _turn_end_accuracy(model, tokenizer, features)
    if train_turn_end:
        assert accuracy >= 0.75, accuracy
    else:  # the frozen tied head cannot prefer <end_of_turn> over its 100 near-copies
        assert accuracy <= 0.25, accuracy


def test_generation_never_emits_an_untrained_token(planted_path):
    """With every untrained token made the likeliest, suppression still keeps them out of the reply."""
    tokenizer = AutoTokenizer.from_pretrained(planted_path)
    model = build_qlora_model(planted_path, lora=LoraSettings(train_turn_end=False))
    untrained = untrained_token_ids(tokenizer)
    bias = torch.zeros(len(tokenizer))
    bias[untrained] = 100.0
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda _m, _a, out: out + bias.to(out.dtype))
    prompts, _ = evaluation_pairs(PersianChatDataset.bundled(tokenizer).conversations[:2])
    suppressed = generate(model, tokenizer, prompts, max_new_tokens=6)
    assert all(suppressed.texts), suppressed.texts  # ordinary tokens, in spite of the bias
    free = generate(model, tokenizer, prompts, max_new_tokens=6, suppress_untrained=False)
    assert free.texts == ["", ""]  # everything it emitted was a special token, decoded away


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_suppression_replies_as_transformers_suppress_tokens_would(planted_path, monkeypatch, do_sample):
    """The library suppresses untrained tokens with its own processor (transformers' rebuilds a vocabulary-wide mask
    every step); the replies are the ones transformers' ``SuppressTokensLogitsProcessor`` gives, greedy or sampled
    with the same seed (suppression comes before top-k and top-p either way), and hold no suppressed id even where
    every one of them is the likeliest. A ``suppress_tokens`` given by the caller is suppressed too."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    tokenizer = AutoTokenizer.from_pretrained(planted_path)
    model = build_qlora_model(planted_path, lora=LoraSettings(train_turn_end=False))
    untrained = untrained_token_ids(tokenizer)
    bias = torch.zeros(len(tokenizer))
    bias[untrained] = 100.0
    model.get_base_model().lm_head.register_forward_hook(lambda _m, _a, out: out + bias.to(out.dtype))
    prompts, _ = evaluation_pairs(PersianChatDataset.bundled(tokenizer).conversations[:3])
    sampling = {"do_sample": True, "temperature": 0.7, "top_k": 64, "top_p": 0.95} if do_sample else {}
    replies: list[list[int]] = []  # the ids of each reply of ours, up to its stop token
    original = model.generate

    def recording(**kwargs):
        output = original(**kwargs)
        for row in output[:, kwargs["input_ids"].shape[1] :].tolist():
            end = next((k for k, t in enumerate(row) if t in stop_token_ids(tokenizer)), len(row) - 1)
            replies.append(row[: end + 1])
        return output

    monkeypatch.setattr(model, "generate", recording)
    torch.manual_seed(0)
    generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, **sampling)
    extra = [replies[0][0]]  # the token the first reply starts with
    suppressed = sorted({*untrained, *extra})
    replies.clear()
    torch.manual_seed(0)
    ours = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, suppress_tokens=extra, **sampling)
    monkeypatch.undo()
    torch.manual_seed(0)
    reference = LogitsProcessorList([SuppressTokensLogitsProcessor(suppressed)])
    theirs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=8,
        batch_size=2,
        suppress_untrained=False,
        logits_processor=reference,
        **sampling,
    )
    assert ours.texts == theirs.texts and ours.new_tokens == theirs.new_tokens
    assert all(ours.texts), ours.texts  # ordinary tokens, in spite of the bias
    generated = {t for reply in replies for t in reply}
    assert len(replies) == len(prompts) and not generated & set(suppressed), sorted(generated & set(suppressed))
