"""Gemma 4: the family table's entries and refusals, its turn format against the official template, KV sharing in
training, and the mixture-of-experts refusal."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from persian_qlora import PersianChatDataset, PersianQLoRAError, gemma4_chat_template
from persian_qlora.collator import GemmaChatCollator
from persian_qlora.families import FAMILIES, GEMMA4_TURNS, UNSUPPORTED, family_of, turn_format_of
from persian_qlora.generation import evaluation_pairs, generate, stop_token_ids
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.modeling import build_lora_model, build_qlora_model
from persian_qlora.tokens import untrained_token_ids

TRL_TEMPLATE = "gemma4_v5.jinja"  # the newest of TRL 1.16's Gemma 4 templates


def _trl_template() -> str:
    from importlib import resources

    return resources.files("trl").joinpath("chat_templates", TRL_TEMPLATE).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- the family table


def test_family_of_knows_or_refuses_every_gemma4_model_type():
    """Every Gemma 4 model type of the installed transformers that a causal LM is built from (the checkpoints one
    could fine-tune; tower sub-configs are not) is a known family, or refused with its reason; the known ones name
    classes transformers has."""
    gemma4_types = sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t.startswith("gemma4"))
    assert {"gemma4", "gemma4_text"} <= set(gemma4_types)
    for model_type in gemma4_types:
        config = SimpleNamespace(model_type=model_type)  # some defaults do not validate (gemma4_assistant)
        if model_type in FAMILIES:
            family = family_of(config)
            assert family.turns is GEMMA4_TURNS and hasattr(transformers, family.causal_lm_class)
        else:
            with pytest.raises(PersianQLoRAError, match=f"{model_type!r} is not supported: .+ instead"):
                family_of(config)
    assert set(gemma4_types) <= FAMILIES.keys() | UNSUPPORTED.keys()


def test_the_shipped_template_is_the_newest_official_one(tiny_gemma4_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma4_path)
    assert gemma4_chat_template() == _trl_template() == tokenizer.chat_template
    assert turn_format_of(tokenizer) is GEMMA4_TURNS


def test_gemma4_control_tokens_are_reserved_untrained_or_stop_tokens(tiny_gemma4_path):
    """The turn markers stop generation, media placeholders are never generated, and no data may contain a
    Gemma 4 control token (whichever model it will train)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma4_path)
    assert set(stop_token_ids(tokenizer)) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")}
    untrained = set(untrained_token_ids(tokenizer))
    assert {tokenizer.convert_tokens_to_ids(t) for t in ("<|image|>", "<|audio|>", "<pad>")} <= untrained
    assert tokenizer.convert_tokens_to_ids("<turn|>") not in untrained
    for token in ("<|turn>", "<|channel>", "<|tool_call>"):
        record = {"messages": [{"role": "user", "content": f"سلام {token}"}, {"role": "assistant", "content": "x"}]}
        with pytest.raises(PersianQLoRAError, match="control token"):
            PersianChatDataset([record], tokenizer)


# ----------------------------------------------------------------------------------- rendering and masking

_LONG = " ".join(["زبان فارسی یکی از زبان‌های هندواروپایی است و در ایران، افغانستان و تاجیکستان سخن گفته می‌شود."] * 30)
CONVERSATIONS = [
    [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "سلام! چطور می‌توانم کمک کنم؟"}],
    [
        {"role": "system", "content": "تو دستیاری مؤدب هستی."},
        {"role": "user", "content": "پایتخت ایران کجاست؟"},
        {"role": "assistant", "content": "تهران."},
    ],
    [
        {"role": "user", "content": "یک عدد بگو"},
        {"role": "assistant", "content": "۴۲"},
        {"role": "user", "content": "دو برابرش؟"},
        {"role": "assistant", "content": "۸۴"},
        {"role": "user", "content": "و نصفش؟"},
        {"role": "assistant", "content": "۲۱"},
    ],
    [
        {"role": "system", "content": "کوتاه پاسخ بده."},
        {"role": "user", "content": "حافظ کیست؟"},
        {"role": "assistant", "content": "شاعر قرن هشتم شیراز."},
        {"role": "user", "content": "سعدی چطور؟"},
        {"role": "assistant", "content": "او هم شاعر شیرازی است."},
    ],
    [{"role": "user", "content": "  فاصله‌ها  "}, {"role": "assistant", "content": "  متن با فاصله در دو سو  "}],
    [{"role": "user", "content": "کد بنویس"}, {"role": "assistant", "content": "def f():\n    return 'سلام'\n"}],
    [{"role": "user", "content": "English and فارسی"}, {"role": "assistant", "content": "Both: hello و سلام."}],
    [{"role": "user", "content": "خط\nدوم\n\nسوم"}, {"role": "assistant", "content": "یک\n\nدو"}],
    [{"role": "user", "content": "شعر"}, {"role": "assistant", "content": _LONG}],  # cut by max_length
    [{"role": "user", "content": _LONG}, {"role": "assistant", "content": "خلاصه: فارسی."}],  # cut before the reply
    [
        {"role": "system", "content": "به فارسی پاسخ بده."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "چهار."},
        {"role": "user", "content": "و ۳+۳؟"},
        {"role": "assistant", "content": "شش."},
    ],
    [{"role": "user", "content": "اعداد: 1، ۲، ٣"}, {"role": "assistant", "content": "سه عدد با سه خط."}],
]
MAX_LENGTH = 160


def _official_labels(tokenizer, conversation, max_length):
    """The oracle, from text: render with TRL's official template (thinking off), mark the characters of every
    model turn's content and its ``<turn|>``, and label the tokens that lie inside them."""
    from jinja2 import Environment

    text = (
        Environment()
        .from_string(_trl_template())
        .render(messages=conversation, bos_token="<bos>", add_generation_prompt=False, enable_thinking=False)
    )
    trained = [False] * len(text)
    header = "<|turn>model\n"
    start = text.find(header)
    while start >= 0:
        end = text.index("<turn|>", start) + len("<turn|>")
        trained[start + len(header) : end] = [True] * (end - start - len(header))
        start = text.find(header, end)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_length]
    labels = [
        token if all(trained[a:b]) and b > a else IGNORE_INDEX
        for token, (a, b) in zip(ids, encoded["offset_mapping"][:max_length], strict=True)
    ]
    return ids, labels


def test_persian_data_renders_and_masks_exactly_as_the_official_template(tiny_gemma4_path):
    """12 varied conversations: the ids are the official template's (thinking off, native system turn), and the
    labels are exactly every model turn's content and ``<turn|>``; a cut conversation keeps the oracle's prefix,
    and one cut before any reply is dropped."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma4_path)
    dataset = PersianChatDataset(
        [{"messages": c} for c in CONVERSATIONS], tokenizer, max_length=MAX_LENGTH, normalize=None
    )
    kept = {tuple((m["role"], m["content"].strip()) for m in c): i for i, c in enumerate(dataset.conversations)}
    assert len(dataset) == len(CONVERSATIONS) - 1 and dataset.stats.truncated == 1
    assert dataset.stats.dropped == {"no trained tokens after truncation": 1}
    for conversation in CONVERSATIONS:
        cleaned = tuple((m["role"], m["content"].strip()) for m in conversation)
        ids, labels = _official_labels(tokenizer, conversation, MAX_LENGTH)
        if cleaned not in kept:
            assert all(label == IGNORE_INDEX for label in labels)  # the one cut before its reply
            continue
        item = dataset[kept[cleaned]]
        assert item["input_ids"] == ids
        assert item["labels"] == labels
        if conversation[0]["role"] == "system":
            assert tokenizer.decode(ids).startswith("<bos><|turn>system\n")
        trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert "<|turn>" not in trained and "<|channel>" not in trained


def test_an_empty_model_turn_is_never_trained(tiny_gemma4_path):
    """The official template writes an empty reply as ``<|turn>model\\n<turn|>``, which would teach the model to
    answer nothing: the dataset never renders one."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma4_path)
    records = [
        {"messages": [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "  "}]},
        {
            "messages": [
                {"role": "user", "content": "سلام"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "هستی؟"},
                {"role": "assistant", "content": "بله."},
            ]
        },
    ]
    dataset = PersianChatDataset(records, tokenizer)
    assert len(dataset) == 1 and dataset.stats.dropped == {"no model turn": 1}
    empty_turn = tokenizer.encode("<|turn>model\n<turn|>", add_special_tokens=False)
    ids = dataset[0]["input_ids"]
    assert not any(ids[i : i + len(empty_turn)] == empty_turn for i in range(len(ids)))
    assert tokenizer.decode([t for t in dataset[0]["labels"] if t != IGNORE_INDEX]) == "بله.<turn|>"


# ------------------------------------------------------------------------------------------------ KV sharing


def _conversations(tokenizer, count=3):
    dataset = PersianChatDataset.bundled(tokenizer, max_length=96)
    return [dataset[i] for i in range(count)]


def _loss_sums(logits, labels):
    """Summed next-token cross-entropy of each row, in fp64."""
    shifted = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].double().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(dim=1)


@pytest.fixture(scope="module")
def gemma4(tiny_gemma4_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma4_path, dtype=torch.float32).eval()
    assert model.config.num_kv_shared_layers == 2 and "reuse" in model.config.kv_sharing_modes
    return model, AutoTokenizer.from_pretrained(tiny_gemma4_path)


def test_padding_free_packed_training_gives_each_conversation_its_cached_inference_loss(gemma4):
    """Three conversations packed in one row (no cache, as training runs) each get the loss the same model gives
    that conversation alone through the cached path that generation uses: the KV-shared layers saw their own
    conversation's source keys and values, and only those."""
    model, tokenizer = gemma4
    features = _conversations(tokenizer)
    packed = GemmaChatCollator(tokenizer, padding_free=True)(features)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist() + [packed["input_ids"].shape[1]]
    for feature, start, end in zip(features, starts, starts[1:], strict=False):
        labels = torch.tensor([feature["labels"]])
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([feature["input_ids"]]), use_cache=True).logits
        packed_loss = _loss_sums(logits[:, start:end], packed["labels"][:, start:end])
        torch.testing.assert_close(packed_loss, _loss_sums(alone, labels), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_gemma4_path):
    """The library's training model with gradient checkpointing (no cache) has the loss and LoRA gradients of the
    same model without it run through the cache path, so the recomputed layers still feed the shared ones."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma4_path)
    batch = GemmaChatCollator(tokenizer)(_conversations(tokenizer, 2))
    results = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = build_lora_model(
            str(tiny_gemma4_path), gradient_checkpointing=checkpointing, lora=None, dtype=torch.float32
        )
        with torch.no_grad():  # non-zero B, so every LoRA matrix gets a gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        loss = model(**batch, use_cache=not checkpointing).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for g in grads.values())
        results.append((loss.detach(), grads))
    (loss, grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_forward_without_cache_gives_generations_cached_logits(gemma4):
    """Greedy generation's per-step logits (the cached path) are the logits of one forward over the whole
    generated sequence with ``use_cache=False``, as training computes them."""
    model, tokenizer = gemma4
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ایران کجاست؟"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(
        prompt,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=None,
    )
    cached = torch.stack(out.logits, dim=1)
    with torch.no_grad():
        whole = model(input_ids=out.sequences, use_cache=False).logits
    width = prompt.shape[1]
    torch.testing.assert_close(whole[:, width - 1 : -1], cached, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- mixture of experts


def test_a_mixture_of_experts_checkpoint_is_refused_in_4bit_and_trains_experts_frozen_in_16bit(
    tiny_gemma4_moe_path,
):
    config = AutoConfig.from_pretrained(tiny_gemma4_moe_path)
    experts = family_of(config).expert_parameters(config)
    assert experts == config.num_hidden_layers * 4 * 3 * 64 * 64
    with pytest.raises(PersianQLoRAError, match=r"mixture-of-experts .*0\.00 B parameters.*16-bit LoRA"):
        build_qlora_model(str(tiny_gemma4_moe_path))
    model = build_lora_model(str(tiny_gemma4_moe_path))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expert_params = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert sum(p.numel() for p in expert_params.values()) == experts
    assert not [n for n, p in expert_params.items() if p.requires_grad or p.dtype != torch.float32]


# -------------------------------------------------------------------------------------- LoRA targets, towers


def test_lora_targets_the_language_models_projections_and_never_a_clippable_linear(
    tiny_gemma4_multimodal_hub_path,
):
    model = build_qlora_model(str(tiny_gemma4_multimodal_hub_path), text_only=False)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert adapted and all(".language_model.layers." in n for n in adapted)
    clippable = [m for m in model.modules() if type(m).__name__ == "Gemma4ClippableLinear"]
    assert clippable and not [m for m in clippable if isinstance(m.linear, LoraLayer)]
    # the KV-shared layers have no keys or values of their own to adapt
    shared = model.get_base_model().config.text_config.kv_sharing_modes.index("reuse")
    assert not [n for n in adapted if f".layers.{shared}.self_attn.k_proj" in n]


def test_generate_and_the_chat_cli_speak_gemma4(tiny_gemma4_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma4_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma4_path)
    prompts, _ = evaluation_pairs(PersianChatDataset.bundled(tokenizer, "test").conversations[:2])
    result = generate(model, tokenizer, prompts, max_new_tokens=4)
    assert len(result.texts) == 2 and all(n > 0 for n in result.new_tokens)
    chat = subprocess.run(
        [sys.executable, "-m", "persian_qlora.cli", "chat", "--model", str(tiny_gemma4_path), "--greedy"]
        + ["--max-new-tokens", "4", "--system", "کوتاه پاسخ بده."],
        input="سلام\n/exit\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("مدل> ") == 1
    assert json.loads((tiny_gemma4_path / "generation_config.json").read_text())["eos_token_id"] == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<turn|>"),
    ]


@pytest.mark.parametrize("fixture", ["tiny_gemma4_path", "tiny_gemma4_multimodal_hub_path"])
def test_compare_runs_end_to_end_on_gemma4(request, fixture, tmp_path):
    """QLoRA and LoRA trained, evaluated before/after, and the QLoRA adapter merged and evaluated, on a Gemma 4
    text checkpoint and on a whole multimodal one (loaded text-only)."""
    from persian_qlora.compare import CompareConfig, compare
    from persian_qlora.dataset import bundled_corpus_path
    from persian_qlora.training import RunConfig

    path = request.getfixturevalue(fixture)
    overrides = {"model": str(path), "data": str(bundled_corpus_path("train")), "max_steps": 1, "max_length": 128}
    small = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1}  # one conversation a step: fast
    run = RunConfig.load(None, {**overrides, **small, "save_strategy": "no", "disable_tqdm": True})
    config = CompareConfig(
        run=run, output_dir=str(tmp_path), test_data=str(bundled_corpus_path("test")), max_eval=2, max_new_tokens=4
    )
    compare(config)
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in report["runs"]] == ["qlora", "lora"]
    assert all(r["train"]["global_step"] == 1 and r["train"]["trained_tokens"] > 0 for r in report["runs"])
    assert report["runs"][0]["merged"][0]["n"] == 2


def test_a_bf16_merge_keeps_the_towers_unbounded_clipping_limits(tiny_gemma4_multimodal_hub_path, tmp_path):
    """Gemma 4's clippable linears store ±inf where they do not clip: a merge into bf16 casts them exactly instead
    of taking them for a broken weight."""
    from safetensors import safe_open

    from persian_qlora import merge_to_fp16

    path = tiny_gemma4_multimodal_hub_path
    model = build_lora_model(str(path), lora=None, gradient_checkpointing=False)
    model.save_pretrained(tmp_path / "adapter")
    model.base_loading.save(tmp_path / "adapter")
    merge_to_fp16(path, tmp_path / "adapter", tmp_path / "merged")
    limits = {}
    for file in sorted((tmp_path / "merged").glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            limits.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(("input_max", "output_min"))})  # noqa: SIM118
    assert limits and all(t.dtype == torch.bfloat16 and t.isinf().all() for t in limits.values())
