"""The tiny Gemma models and tokenizer load offline, train, and behave like Gemma's."""

import json

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from persian_qlora import gemma3_chat_template
from persian_qlora.testing import GEMMA_SPECIAL_TOKENS, build_tiny_gemma, build_tiny_tokenizer

TEXTS = [
    "سلام! حالت چطوره؟ می‌خواهم دربارهٔ معماری اصفهان بدانم.",
    "The quick brown fox, 42 times; naïve café 😀 — «نقل قول» ۱۴۰۲",
    "def f(x):\n    return x ** 2\n\n\n",
    "ۀ ء ؤ ئ ٔ ً \u200c\u200f",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_any_text_without_unk(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_has_gemma_special_tokens_as_single_tokens(tiny_tokenizer):
    for token in GEMMA_SPECIAL_TOKENS:
        assert tiny_tokenizer.encode(token, add_special_tokens=False) == [tiny_tokenizer.convert_tokens_to_ids(token)]
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.eos_token, tiny_tokenizer.bos_token, tiny_tokenizer.unk_token) == (
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
    )


def test_tokenizer_build_is_deterministic():
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == build_tiny_tokenizer().backend_tokenizer.to_str()


def test_chat_template_is_gemma3s(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == gemma3_chat_template()
    messages = [
        {"role": "system", "content": "تو دستیار هستی."},
        {"role": "user", "content": "  سلام  "},
        {"role": "assistant", "content": [{"type": "text", "text": "درود! "}]},
        {"role": "user", "content": "چطوری؟"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<bos><start_of_turn>user\nتو دستیار هستی.\n\nسلام<end_of_turn>\n"
        "<start_of_turn>model\nدرود!<end_of_turn>\n"
        "<start_of_turn>user\nچطوری؟<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_chat_template_rejects_non_alternating_roles(tiny_tokenizer):
    with pytest.raises(TemplateError, match="alternate"):
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


@pytest.mark.parametrize("fixture", ["tiny_gemma3_path", "tiny_gemma3n_path", "tiny_gemma3_vision_path"])
def test_tiny_models_load_offline_and_train(request, fixture):
    path = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود بر شما"}],
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    extra = {"token_type_ids": torch.zeros_like(ids)} if "vision" in fixture else {}
    out = model(input_ids=ids, labels=ids, **extra)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("fixture", "class_name"),
    [
        ("tiny_gemma3_path", "Gemma3ForCausalLM"),
        ("tiny_gemma3n_path", "Gemma3nForCausalLM"),
        ("tiny_gemma3_vision_path", "Gemma3ForConditionalGeneration"),
    ],
)
def test_tiny_model_directory_is_a_gemma_checkpoint(request, fixture, class_name):
    path = request.getfixturevalue(fixture)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [class_name]
    tokenizer = AutoTokenizer.from_pretrained(path)
    generation = GenerationConfig.from_pretrained(path)
    stop = {tokenizer.convert_tokens_to_ids("<eos>"), tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    assert set(generation.eos_token_id) == stop
    assert tokenizer.chat_template == gemma3_chat_template()


def test_tiny_weights_depend_only_on_seed(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_gemma(tmp_path / "a", seed=1))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_gemma(tmp_path / "b", seed=1))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_gemma(tmp_path / "c", seed=2))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny Gemma arch"):
        build_tiny_gemma(tmp_path, "llama")


def test_vocab_size_is_the_models_rows_even_beyond_what_the_tokenizer_learns(tmp_path):
    """Asking for Gemma-like width gives it: the corpus supports fewer tokens than the rows asked for, and the
    model must still have every row (a throughput benchmark once measured an 8.5k-row head for a 262k one)."""
    path = build_tiny_gemma(tmp_path, vocab_size=10_000)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tokenizer) < 10_000
    assert model.config.vocab_size == 10_000
    assert model.get_output_embeddings().weight.shape[0] == 10_000
    ids = tokenizer("سلام دنیا", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 10_000


@pytest.mark.parametrize("vocab_size", [2048, 400])  # the default; one below the tokenizer's alphabet (421 tokens)
def test_every_token_has_exactly_one_row_when_the_corpus_allows_the_size(tmp_path, vocab_size):
    path = build_tiny_gemma(tmp_path, vocab_size=vocab_size)
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == len(AutoTokenizer.from_pretrained(path))


def test_the_tiny_tokenizer_never_sees_the_test_split(tmp_path, monkeypatch):
    # The demo scores on the test split, so the tokenizer built for it must be the same whatever that split holds.
    import persian_qlora.dataset
    from persian_qlora.tiny import build_tiny_tokenizer

    bundled = persian_qlora.dataset.bundled_corpus_path
    vocab = build_tiny_tokenizer().get_vocab()
    other_test = tmp_path / "test.jsonl"
    turn = {"messages": [{"role": "user", "content": "ژاژخایی ژاژخایی ژاژخایی"}, {"role": "assistant", "content": "ژ"}]}
    other_test.write_text((json.dumps(turn, ensure_ascii=False) + "\n") * 50, encoding="utf-8")
    monkeypatch.setattr(
        persian_qlora.dataset, "bundled_corpus_path", lambda split: other_test if split == "test" else bundled(split)
    )
    assert build_tiny_tokenizer().get_vocab() == vocab
