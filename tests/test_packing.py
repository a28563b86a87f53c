"""Padding-free packing and the lean chunked loss give the loss and gradients of the plain, padded computation."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from persian_qlora import GemmaChatCollator, PersianChatDataset
from persian_qlora.loss import chunked_causal_lm_loss, final_hidden_states, lean_model_loss
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.modeling import LoraSettings, build_lora_model
from persian_qlora.pytest_plugin import TINY_LAYOUTS
from persian_qlora.testing import build_tiny_gemma
from persian_qlora.training import TrainConfig, make_trainer

ARCHS = ["tiny_gemma3_path", "tiny_gemma3n_path", "tiny_gemma3n_kv_shared_path", "tiny_gemma3_vision_path"]


@pytest.fixture(scope="module")
def tiny_gemma3n_kv_shared_path(tmp_path_factory):
    """Gemma 3n with its last layers reading earlier layers' keys and values, as E4B's last 15 of 35 do."""
    layer_types = ["sliding_attention", "full_attention"] * 2
    path = tmp_path_factory.mktemp("tiny-gemma3n-kv-shared")
    return build_tiny_gemma(path, "gemma3n", num_hidden_layers=4, layer_types=layer_types, num_kv_shared_layers=2)


def _features(path, count=3):
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=200)
    # Longer than the tiny models' sliding window (64), so the local layers' windows are exercised too.
    features = [dataset[i] for i in range(len(dataset)) if len(dataset[i]["input_ids"]) > 80][:count]
    assert len(features) == count
    return tokenizer, features


def _load(path, attention):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    return model.train()


def _plain_loss(model, batch, num_items):
    """The loss transformers computes from full logits, normalised by ``num_items`` trained tokens."""
    return model(**batch, use_cache=False, num_items_in_batch=num_items).loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fixture", ARCHS)
def test_a_packed_batch_has_the_loss_and_gradients_of_its_conversations_run_separately(request, fixture, attention):
    path = request.getfixturevalue(fixture)
    tokenizer, features = _features(path)
    model = _load(path, attention)
    num_items = sum(sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in features)

    separate = GemmaChatCollator.for_model(tokenizer, model)
    loss = sum(_plain_loss(model, separate([f]), num_items) for f in features)
    loss.backward()
    expected_loss, expected_grads = loss.detach(), _grads(model)
    model.zero_grad()

    packed_batch = GemmaChatCollator.for_model(tokenizer, model, padding_free=True)(features)
    assert packed_batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    assert "attention_mask" not in packed_batch
    packed = _plain_loss(model, packed_batch, num_items)
    packed.backward()

    torch.testing.assert_close(packed.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    _assert_close(_grads(model), expected_grads)


def test_with_the_kv_cache_on_packed_conversations_would_see_each_other(tiny_gemma3_path):
    """Why the trainer passes use_cache=False: this is the leak it prevents (sdpa, as by default)."""
    tokenizer, features = _features(tiny_gemma3_path, count=2)
    model = _load(tiny_gemma3_path, "sdpa")
    batch = GemmaChatCollator(tokenizer, padding_free=True)(features)
    with torch.no_grad():
        apart = model(**batch, use_cache=False).logits
        leaking = model(**batch, use_cache=True).logits
    first = len(features[0]["input_ids"])
    torch.testing.assert_close(leaking[:, :first], apart[:, :first])
    assert (leaking[:, first:] - apart[:, first:]).abs().max() > 1e-3


class _VocabularyMatmuls(TorchDispatchMode):
    """Counts the multiply-adds of the matrix products with a ``vocab``-sized side: the LM head's, forward and back."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.macs = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            left, right = args[-2], args[-1]
            if self.vocab in (*left.shape, *right.shape):
                self.macs += left.shape[0] * left.shape[1] * right.shape[1]
        return func(*args, **(kwargs or {}))


# (fixture, final-logit soft-cap): the model's own (Gemma 3n's 30, none for Gemma 3), and 0.5, which saturates the
# tiny models' logits (up to about 0.75), so a wrong soft-cap gradient shows. Gemma3ForConditionalGeneration
# applies no soft-cap in its own forward, so it is tested without.
_SOFTCAPS = [(fixture, "own") for fixture in ARCHS] + [
    (fixture, 0.5) for fixture in ARCHS if fixture != "tiny_gemma3_vision_path"
]


@pytest.mark.parametrize(("fixture", "softcap"), _SOFTCAPS)
@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_the_chunked_loss_equals_the_plain_loss_with_its_gradients(request, fixture, softcap, head):
    """A frozen head takes the fused path (two head matmuls per row: forward, and the input gradient); a trainable
    one recomputes its chunks (four: forward, recompute, input and weight gradients). Both equal the plain loss."""
    path = request.getfixturevalue(fixture)
    tokenizer, features = _features(path)
    model = _load(path, "sdpa")
    text_config = model.config.get_text_config()
    if softcap != "own":
        text_config.final_logit_softcapping = softcap
    model.get_output_embeddings().requires_grad_(head == "trainable")  # frozen, as in QLoRA and LoRA
    batch = GemmaChatCollator.for_model(tokenizer, model)(features)  # padded: the pad positions must be skipped
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    for num_items in (None, trained + 17):  # the micro-batch's own mean, and a share of an accumulated batch
        expected = _plain_loss(model, batch, num_items)
        expected.backward()
        expected_grads = _grads(model)
        model.zero_grad()

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = final_hidden_states(model, model, **inputs, use_cache=False)
        with _VocabularyMatmuls(text_config.vocab_size) as head_matmuls:
            lean = chunked_causal_lm_loss(
                hidden,
                batch["labels"],
                model.get_output_embeddings(),
                softcap=text_config.final_logit_softcapping,
                num_items_in_batch=num_items,
                chunk_size=37,  # several chunks, the last one short
            )
            lean.backward()
        torch.testing.assert_close(lean.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        _assert_close(_grads(model), expected_grads)
        per_row = text_config.hidden_size * text_config.vocab_size
        assert head_matmuls.macs == (2 if head == "frozen" else 4) * trained * per_row
        model.zero_grad()


def test_a_lora_adapted_lm_head_gets_the_plain_loss_gradients(tiny_gemma3_path):
    """A peft-wrapped head is not fused (the fused path reads the frozen base weight alone): LoRA's own gradients."""
    from peft import LoraConfig, get_peft_model

    tokenizer, features = _features(tiny_gemma3_path, count=2)
    model = get_peft_model(
        _load(tiny_gemma3_path, "sdpa"), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    )
    batch = GemmaChatCollator.for_model(tokenizer, model)(features)
    _plain_loss(model, batch, None).backward()
    expected = _grads(model)
    assert any("lm_head.lora_B" in name for name in expected)
    model.zero_grad()
    lean_model_loss(model, batch.pop("labels"), chunk_size=37, **batch, use_cache=False).backward()
    _assert_close(_grads(model), expected)


def test_the_fused_loss_keeps_bf16_states_and_an_fp32_loss():
    """bf16 hidden states and head, as on a GPU: the loss is fp32, the input gradient bf16, both as the plain loss."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 3000, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(2, 90, 64, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 3000, (2, 90))
    labels[:, :30] = IGNORE_INDEX

    plain = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).float().flatten(0, 1), labels[:, 1:].flatten())
    plain.backward()
    expected, hidden.grad = hidden.grad, None
    lean = chunked_causal_lm_loss(hidden, labels, head, chunk_size=37)
    lean.backward()
    assert lean.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lean, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected, rtol=2e-2, atol=1e-5)  # bf16 rounding, in another order


@pytest.mark.parametrize("frozen", [True, False])
def test_the_chunked_loss_is_the_mean_over_trained_tokens(frozen):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(not frozen)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 7, -100, -100, 9, 1]])
    log_probs = torch.log_softmax(head(hidden), dim=-1)
    by_hand = -torch.stack(
        [log_probs[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 6) if labels[b, t] != -100]
    )
    assert by_hand.numel() == 5
    torch.testing.assert_close(chunked_causal_lm_loss(hidden, labels, head, chunk_size=2), by_hand.mean())
    torch.testing.assert_close(chunked_causal_lm_loss(hidden, labels, head, num_items_in_batch=20), by_hand.sum() / 20)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_causal_lm_loss(hidden, labels, head, chunk_size=0)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_batch_with_no_trained_token_still_backpropagates(frozen):
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(not frozen)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, torch.full((1, 4), -100), head, num_items_in_batch=3)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None


def _one_accumulated_step(path, tmp_path, batch=4, accumulation=2, text_only=True, **settings):
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=160)
    samples = [dataset[i] for i in range(8)]  # 2 micro-batches of 4, of unequal trained-token counts
    config = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        warmup_steps=0,
        optim="sgd",
        save_steps=100,
        extra={"disable_tqdm": True, "max_grad_norm": 0.0, "train_sampling_strategy": "sequential"},
        **settings,
    )
    torch.manual_seed(0)
    random_b = LoraSettings(extra={"init_lora_weights": False})  # every LoRA weight gets a gradient
    model = build_lora_model(path, lora=random_b, text_only=text_only)
    trainer = make_trainer(model, tokenizer, samples, config=config)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


def test_every_training_setting_takes_the_same_accumulated_step(tiny_gemma3_path, tmp_path):
    """Padding-free + lean loss (the defaults), padded + lean, and padded + plain: one SGD step, same weights."""
    plain = {"padding_free": False, "lean_loss": False}
    reference, trainer = _one_accumulated_step(tiny_gemma3_path, tmp_path / "plain", **plain)
    assert trainer.args.train_sampling_strategy == "sequential"  # extra wins over the group_by_length fallback
    for name, settings in {
        "padded, lean loss": {"padding_free": False},
        "padding-free, lean loss": {},
        "padding-free, plain loss": {"lean_loss": False},
    }.items():
        weights, _ = _one_accumulated_step(tiny_gemma3_path, tmp_path / name, **settings)
        moved = max((weights[n] - reference[n]).abs().max().item() for n in reference)
        assert moved < 1e-6, (name, moved)


@pytest.mark.parametrize("lean_loss", [True, False], ids=["lean", "plain"])
@pytest.mark.parametrize(("fixture", "text_only"), TINY_LAYOUTS)
def test_gradient_accumulation_weighs_every_token_alike_in_every_family(
    request, tmp_path, fixture, text_only, lean_loss
):
    """Two accumulated micro-batches of 4 take the step one batch of 8 takes, though their token counts differ:
    the multimodal classes too, which transformers would otherwise average per micro-batch."""
    path = request.getfixturevalue(fixture)
    settings = {"text_only": text_only, "lean_loss": lean_loss}
    whole, _ = _one_accumulated_step(path, tmp_path / "8x1", batch=8, accumulation=1, **settings)
    accumulated, _ = _one_accumulated_step(path, tmp_path / "4x2", **settings)
    moved = max((accumulated[n] - whole[n]).abs().max().item() for n in whole)
    assert moved < 1e-6, moved


def test_padding_free_and_pad_to_multiple_of_exclude_each_other(tiny_tokenizer):
    with pytest.raises(ValueError, match="padding-free"):
        GemmaChatCollator(tiny_tokenizer, padding_free=True, pad_to_multiple_of=8)


def test_without_packing_the_trainer_groups_conversations_by_length(tmp_path):
    assert TrainConfig(output_dir=str(tmp_path)).training_arguments().train_sampling_strategy == "random"
    padded = TrainConfig(output_dir=str(tmp_path), padding_free=False).training_arguments()
    assert padded.train_sampling_strategy == "group_by_length"


def _saved_for_backward_bytes(compute) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``compute()``, parameters excluded."""
    saved = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute().backward()
    return sum(saved.values())


def test_the_lean_loss_keeps_a_chunk_of_logits_not_all_of_them_at_gemma_vocabulary():
    """At 262,144 tokens the plain loss keeps every position's logits for backward; the lean loss recomputes them."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 262_144, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 600, 64, requires_grad=True)
    labels = torch.full((1, 600), -100)
    labels[0, 200:] = 5  # two thirds of the positions are model turns

    def plain():
        logits = head(hidden).float()
        return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)

    plain_bytes = _saved_for_backward_bytes(plain)
    lean_bytes = _saved_for_backward_bytes(lambda: chunked_causal_lm_loss(hidden, labels, head, chunk_size=64))
    one_chunk = 64 * 262_144 * 4
    assert plain_bytes > 599 * 262_144 * 4  # the full fp32 logits
    assert lean_bytes < one_chunk / 100, (lean_bytes, plain_bytes)
    torch.testing.assert_close(
        chunked_causal_lm_loss(hidden, labels, head, chunk_size=64), plain(), rtol=1e-5, atol=1e-6
    )


class _LiveVocabularyTensors(TorchDispatchMode):
    """The most bytes that tensors with a ``vocab``-sized dimension (logits, their softmax) hold at once.

    Every op's new tensors are tracked by their storage until it is freed; views allocate nothing and are skipped.
    Works on the meta device too, where a storage has its size but no memory.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.peak, self._live = vocab, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._live = {key: kept for key, kept in self._live.items() if not kept[0].expired()}
        if not func.is_view:
            for tensor in torch.utils._pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and self.vocab in tensor.shape:
                    storage = tensor.untyped_storage()
                    ref = StorageWeakRef(storage)
                    self._live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self._live.values()))
        return out


def test_evaluation_keeps_a_chunk_of_logits_not_all_of_them_at_gemma_vocabulary(tiny_gemma3_path, tmp_path):
    """Trainer's evaluation step at 2 × 4000 tokens and 262,144 tokens of vocabulary: asked for the loss alone (no
    ``compute_metrics``), it is lean; asked for logits too, it is the plain forward. The plain side runs its LM
    head on the meta device: its 2 × 4000 × 262,144 fp32 logits (8 GB) are counted, not allocated."""
    from transformers import Gemma3ForCausalLM

    vocab = 262_144
    config = AutoConfig.from_pretrained(tiny_gemma3_path)
    config.vocab_size = vocab
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    trainer = make_trainer(model, tokenizer, [], config=TrainConfig(output_dir=str(tmp_path), optim="adamw_torch"))
    input_ids = torch.randint(0, len(tokenizer), (2, 4000))
    labels = input_ids.clone()
    labels[:, :3000] = IGNORE_INDEX  # a quarter of the positions are model turns
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    with _LiveVocabularyTensors(vocab) as lean:
        loss, logits, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
    assert logits is None and torch.isfinite(loss)

    meta_head = torch.nn.Linear(config.hidden_size, vocab, bias=False, device="meta")
    meta_head.register_forward_pre_hook(lambda _module, args: (args[0].to("meta"),))
    model.lm_head = meta_head
    with _LiveVocabularyTensors(vocab) as plain:
        _, logits, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=False)
    assert logits.shape == (2, 4000, vocab)

    assert plain.peak >= 2 * 4000 * vocab * 4  # at least the fp32 logits
    assert lean.peak <= 0.10 * plain.peak, (lean.peak, plain.peak)


def _peft_with_trained_rows(path, tied: bool, rows: list[int]):
    """A LoRA model training ``rows`` of its head with peft's trainable tokens, those rows moved off their frozen
    values (peft starts them as copies, which would hide a path that ignores them). Tied: the rows are the
    embedding's, shared with the head; untied: the head's own."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, tie_word_embeddings=tied)
    if not tied:  # the untied head is missing from the tied checkpoint: give it weights of the embedding's scale
        model.lm_head.weight.data = model.get_input_embeddings().weight.detach().flip(0).clone()
    where = "embed_tokens" if tied else "lm_head"
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices={where: rows})
    model = get_peft_model(model, config).train()
    (delta,) = [p for name, p in model.named_parameters() if "trainable_tokens_delta" in name]
    with torch.no_grad():
        delta.add_(torch.randn_like(delta) * delta.std())
    return model, delta


@pytest.mark.parametrize("softcap", [None, 0.5])
@pytest.mark.parametrize("rows", ["few", "both ends"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_fused_loss_with_trained_token_rows_equals_the_plain_loss(tiny_gemma3_path, tied, rows, softcap):
    """A head with peft's trained rows takes the fused path: two vocabulary-sized matmuls per row (the recomputing
    path takes three), the loss, the input gradient and the rows' gradient those of the plain loss."""
    tokenizer, features = _features(tiny_gemma3_path, count=2)
    vocab = AutoConfig.from_pretrained(tiny_gemma3_path).vocab_size
    trained_rows = [tokenizer.convert_tokens_to_ids("<end_of_turn>"), 700, 1500] if rows == "few" else [0, vocab - 1]
    model, delta = _peft_with_trained_rows(tiny_gemma3_path, tied, trained_rows)
    head = model.get_output_embeddings()
    batch = GemmaChatCollator.for_model(tokenizer, model)(features)
    labels = batch.pop("labels")
    labelled = (labels != IGNORE_INDEX).nonzero()
    labels[tuple(labelled[-1])], labels[tuple(labelled[-2])] = trained_rows[0], trained_rows[-1]  # rows as targets
    with torch.no_grad():
        states = final_hidden_states(model, model.get_base_model(), **batch, use_cache=False)
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())

    hidden = states.clone().requires_grad_()
    logits = head(hidden[:, :-1]).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    plain.backward()
    expected_hidden, expected_rows = hidden.grad, delta.grad
    delta.grad = None

    hidden = states.clone().requires_grad_()
    with _VocabularyMatmuls(vocab) as head_matmuls:
        lean = chunked_causal_lm_loss(hidden, labels, head, softcap=softcap, chunk_size=37)
        lean.backward()
    assert head_matmuls.macs == 2 * trained * model.config.hidden_size * vocab
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=1e-5, atol=1e-6)
    assert expected_rows.abs().max() > 1e-4  # the rows' gradient is there to compare
    torch.testing.assert_close(delta.grad, expected_rows, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pretrained_like_path(tmp_path_factory):
    from persian_qlora.testing import plant_turn_end_copies

    return plant_turn_end_copies(build_tiny_gemma(tmp_path_factory.mktemp("pretrained-like"), "gemma3"))


def test_the_defaults_on_a_pretrained_like_base_take_the_fused_path(pretrained_like_path):
    """The defaults train <end_of_turn>'s row of a base where it is not distinct: the head is wrapped by peft, and
    the loss the trainer computes is still fused (two head matmuls per row), with the plain loss's gradients for the
    LoRA weights and the trained row (reached through both the embedding and the tied head)."""
    tokenizer, features = _features(pretrained_like_path, count=2)
    torch.manual_seed(0)
    model = build_lora_model(str(pretrained_like_path), gradient_checkpointing=False)
    assert type(model.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    (delta,) = [p for name, p in model.named_parameters() if "trainable_tokens_delta" in name]
    with torch.no_grad():
        delta.add_(torch.randn_like(delta) * delta.std())
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # zero at initialisation: the LoRA A weights would get no gradient to compare
            torch.nn.init.normal_(parameter, std=0.02)
    batch = GemmaChatCollator.for_model(tokenizer, model)(features)
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    _plain_loss(model, batch, None).backward()
    expected = _grads(model)
    model.zero_grad()
    config = model.config
    with _VocabularyMatmuls(config.vocab_size) as head_matmuls:
        lean_model_loss(model, batch.pop("labels"), chunk_size=37, **batch, use_cache=False).backward()
    assert head_matmuls.macs == 2 * trained * config.hidden_size * config.vocab_size
    assert any("trainable_tokens_delta" in name for name in expected)
    _assert_close(_grads(model), expected)
