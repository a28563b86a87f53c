"""merge_to_fp16, the streaming merge: fidelity to peft and to the trained QLoRA model on every layout, what is
written (the whole original checkpoint), adapter kinds and tied heads, refusals, and atomic, refusing writes."""

import json
import os
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from persian_qlora import PersianChatDataset, PersianQLoRAError
from persian_qlora.families import FAMILIES
from persian_qlora.loading import PROVENANCE_FILE, load_base
from persian_qlora.merging import merge_to_fp16
from persian_qlora.modeling import LoraSettings, build_lora_model, build_qlora_model
from persian_qlora.pytest_plugin import TINY_LAYOUTS
from persian_qlora.testing import build_tiny_gemma
from persian_qlora.training import TrainConfig, make_trainer

# Every tiny layout, with adapters trained on the language model alone (the default) or on the whole model.
LAYOUTS = TINY_LAYOUTS
PROBE = [{"role": "user", "content": "ایران کجاست؟"}, {"role": "assistant", "content": "در غرب آسیا."}]
BF16_HALF_ULP = 2**-8  # bf16 keeps 8 significant bits: rounding moves a value by at most this share of it


def _family(path):
    return FAMILIES[json.loads((path / "config.json").read_text())["model_type"]]


def _text_name(family, name):
    """A checkpoint tensor or whole-model parameter name as the text model names it (the family table's rule)."""
    for pattern, replacement in family.text_weight_names:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def _tensors(path):
    """Every tensor of a checkpoint directory by its stored name, read with safetensors itself."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return tensors


def _identical(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _adapter(base, directory, builder=build_lora_model, *, text_only=True, lora=None, **extra):
    """An adapter as if trained, without the training: random A *and* B, and trained token rows and whole modules
    moved off their copies of the base, so that merging changes every target. Saved as the trainer saves one:
    peft's files plus base_loading.json. Returns the live PeftModel (base + adapter, unmerged)."""
    torch.manual_seed(0)
    lora = lora if lora is not None else LoraSettings(extra={"init_lora_weights": False, **extra})
    model = builder(str(base), lora=lora, text_only=text_only, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    model.save_pretrained(directory)
    model.base_loading.save(directory)
    return model.eval()


def _lora_targets(model, family):
    """Text names of the weights peft put LoRA on."""
    return {
        f"{_text_name(family, name.removeprefix('base_model.model.'))}.weight"
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _fp32_merge_error_bound(peft_model, family):
    """Per element, how far an fp32 computation of W0 + s·B·A may be from the exact value, in any accumulation
    order: (rank + 3) fp32 roundings (the rank-long dot product, the scale, the sum) of |W0| + s·|B|·|A|."""
    bounds = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            magnitude = module.get_base_layer().weight.float().abs() + module.scaling["default"] * (b.abs() @ a.abs())
            text = _text_name(family, name.removeprefix("base_model.model."))
            bounds[f"{text}.weight"] = (a.shape[0] + 3) * 2**-24 * magnitude
    return bounds


def _ids(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    return tokenizer.apply_chat_template(PROBE, return_tensors="pt", return_dict=True)["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def _as_trained(path, text_only):
    """A merged checkpoint loaded the way its adapter was trained (language model alone, or whole), in fp32."""
    return load_base(path, text_only=text_only, dtype=torch.float32)[0]


@pytest.mark.parametrize(("fixture", "text_only"), LAYOUTS)
def test_an_original_merge_is_peft_merge_and_unload_and_ships_the_whole_checkpoint(
    request, fixture, text_only, tmp_path
):
    base = request.getfixturevalue(fixture)
    family = _family(base)
    model = _adapter(base, tmp_path / "adapter", text_only=text_only)
    targets = _lora_targets(model, family)
    reference = _logits(model, _ids(base))
    oracle = {_text_name(family, k): v for k, v in model.merge_and_unload().state_dict().items()}

    out = tmp_path / "merged"
    result = merge_to_fp16(base, tmp_path / "adapter", out, dtype=torch.float32)  # the base's stored dtype
    written, stored = _tensors(out), _tensors(base)
    assert written.keys() == stored.keys()  # the checkpoint's own names, towers included, nothing else
    text_config = AutoConfig.from_pretrained(base).get_text_config()
    layers, shared = text_config.num_hidden_layers, getattr(text_config, "num_kv_shared_layers", 0)
    assert result.merged_tensors == len(targets) == 7 * layers - 2 * shared  # KV-shared layers have no k, v
    assert result.tied_head
    for name, tensor in written.items():
        if _text_name(family, name) in targets:
            torch.testing.assert_close(tensor, oracle[_text_name(family, name)], rtol=1e-5, atol=1e-7)
            assert not torch.equal(tensor, stored[name])
        else:
            assert _identical(tensor, stored[name]), name  # byte for byte: towers, embeddings, norms...

    # The rest of the checkpoint is the base's, file for file (the card aside).
    side = {p.name for p in base.iterdir() if not p.name.endswith((".safetensors", ".safetensors.index.json"))}
    assert side <= {p.name for p in out.iterdir()}
    assert ("processor_config.json" in side) is family.multimodal
    for name in side - {"README.md"}:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    torch.testing.assert_close(_logits(_as_trained(out, text_only), _ids(base)), reference, rtol=0, atol=1e-4)
    if family.multimodal:  # the merged checkpoint is still the whole model: its class, its towers
        whole, original = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(base)
        assert type(whole).__name__ == family.causal_lm_class
        towers = {n: p for n, p in original.named_parameters() if family.is_tower_weight(n)}
        assert towers and all(torch.equal(p, whole.get_parameter(n)) for n, p in towers.items())


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
@pytest.mark.parametrize("arch", ["gemma3", "gemma3n"])
def test_the_default_bf16_merge_of_a_bf16_checkpoint(arch, kernel_copy, tmp_path, monkeypatch):
    """Real Gemma is stored in bf16, the default output: merged weights are peft's within bf16 rounding, every other
    tensor is byte-identical (copied by the kernel, or read and written where it cannot), and the config is
    untouched."""
    if not kernel_copy:
        monkeypatch.delattr("os.copy_file_range", raising=False)
    base = build_tiny_gemma(tmp_path / "base", arch, dtype=torch.bfloat16)
    model = _adapter(base, tmp_path / "adapter", use_rslora=True)  # fp32 LoRA on the bf16 weights, rsLoRA scale
    targets = _lora_targets(model, _family(base))
    fp32 = {n: p.float() for n, p in AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).named_parameters()}
    peft_fp32 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter"
    )
    fp32_error = _fp32_merge_error_bound(peft_fp32, _family(base))
    oracle = peft_fp32.merge_and_unload().state_dict()  # the merge in fp32, as peft's kernels accumulate it

    result = merge_to_fp16(base, tmp_path / "adapter", tmp_path / "merged")
    assert result.dtype == torch.bfloat16
    written, stored = _tensors(tmp_path / "merged"), _tensors(base)
    for name, tensor in written.items():
        if name in targets:
            assert tensor.dtype == torch.bfloat16
            # Both sides compute W0 + s·BA in fp32, in whatever order the CPU's kernels accumulate; ours is then
            # rounded to bf16. Where W0 + s·BA nearly cancels, the two orders differ by more than half a bf16 ULP of
            # the result, so the bound is fp32 rounding of the operands' magnitudes plus half a ULP of the result.
            gap, rounding = 2 * fp32_error[name], BF16_HALF_ULP * oracle[name].abs()
            excess = (tensor.float() - oracle[name]).abs() - (rounding + (1 + BF16_HALF_ULP) * gap)
            assert excess.max() <= 0, f"{name}: {int((excess > 0).sum())} elements beyond the bound"
            assert not torch.equal(tensor.float(), fp32[name])
        else:
            assert _identical(tensor, stored[name]), name
    assert (tmp_path / "merged" / "config.json").read_bytes() == (base / "config.json").read_bytes()


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 32}}],
    ids=["alpha/r", "rslora", "patterns"],
)
def test_each_module_is_scaled_as_peft_scales_it(tiny_gemma3_path, tmp_path, extra):
    model = _adapter(tiny_gemma3_path, tmp_path / "adapter", **extra)
    oracle = model.merge_and_unload().state_dict()
    merge_to_fp16(tiny_gemma3_path, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    for name, tensor in _tensors(tmp_path / "merged").items():
        torch.testing.assert_close(tensor, oracle[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("fixture", "text_only"), LAYOUTS)
def test_an_nf4_merge_is_the_trained_qlora_model(request, fixture, text_only, tmp_path):
    """W0 is bitsandbytes' quantise→dequantise round trip with the recorded settings, for exactly the weights the
    real 4-bit load quantised; the <end_of_turn> row (trainable tokens) lands in the tied embedding; the merged
    model reproduces the trained QLoRA model's logits, and the original-base merge does not."""
    base = request.getfixturevalue(fixture)
    family = _family(base)
    end_of_turn = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<end_of_turn>")
    model = _adapter(
        base, tmp_path / "adapter", build_qlora_model, text_only=text_only, trainable_token_indices=[end_of_turn]
    )
    round_trips, deltas = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            text = _text_name(family, name.removeprefix("base_model.model.").removesuffix(".base_layer"))
            round_trips[f"{text}.weight"] = bnb.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state
            )
        if isinstance(module, LoraLayer):
            text = _text_name(family, name.removeprefix("base_model.model."))
            deltas[f"{text}.weight"] = module.get_delta_weight("default")
    new_row = dict(model.named_parameters())[
        next(n for n, _ in model.named_parameters() if n.endswith("trainable_tokens_delta.default"))
    ]
    reference = _logits(model, _ids(base))

    merge_to_fp16(base, tmp_path / "adapter", tmp_path / "nf4", merge_base="nf4", dtype=torch.float32)
    written, stored = _tensors(tmp_path / "nf4"), _tensors(base)
    changed = {_text_name(family, n) for n, t in written.items() if not _identical(t, stored[n])}
    assert changed == set(round_trips) | {"model.embed_tokens.weight"}  # the 4-bit load's set, and the new row
    for name, tensor in written.items():
        text = _text_name(family, name)
        if text in round_trips:
            expected = round_trips[text].float() + deltas.get(text, 0)
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    embedding = next(t for n, t in written.items() if _text_name(family, n) == "model.embed_tokens.weight")
    assert torch.equal(embedding[end_of_turn], new_row[0].detach())
    assert not any("lm_head" in n for n in written)  # the head stays tied: it gets the new row through the tie

    merged = _logits(_as_trained(tmp_path / "nf4", text_only), _ids(base))
    merge_to_fp16(base, tmp_path / "adapter", tmp_path / "original", dtype=torch.float32)
    original = _logits(_as_trained(tmp_path / "original", text_only), _ids(base))
    nf4_error, original_error = (merged - reference).abs().max(), (original - reference).abs().max()
    assert nf4_error < 1e-4 and original_error > 100 * nf4_error, (nf4_error, original_error)


def test_a_bf16_checkpoint_is_requantised_as_training_loaded_it(tmp_path):
    """QLoRA on CPU quantises the fp32 copy of a bf16 checkpoint (load_dtype float32 in the record), as must the NF4
    merge."""
    base = build_tiny_gemma(tmp_path / "base", "gemma3", dtype=torch.bfloat16)
    model = _adapter(base, tmp_path / "adapter", build_qlora_model)
    assert model.base_loading.load_dtype == "float32"
    reference = _logits(model, _ids(base))
    merge_to_fp16(base, tmp_path / "adapter", tmp_path / "nf4", merge_base="nf4", dtype=torch.float32)
    assert (_logits(_as_trained(tmp_path / "nf4", True), _ids(base)) - reference).abs().max() < 1e-4


# Adapters that change the LM head, the embedding, or both: (peft LoRA config fields, is the head still tied?).
HEAD_KINDS = {
    "trainable tokens": ({"target_modules": ["q_proj"], "trainable_token_indices": [6, 1]}, True),
    "lora on embedding": ({"target_modules": r".*(q_proj|embed_tokens)"}, False),
    "lora on head": ({"target_modules": r".*(q_proj|lm_head)"}, False),
    "lora on both, tied": ({"target_modules": r".*(q_proj|lm_head)", "ensure_weight_tying": True}, True),
    "head trained whole": ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, False),
    "head trained whole, tied": (
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True},
        True,
    ),
}


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_the_head_stays_tied_when_training_kept_it_tied_and_is_written_apart_when_not(tiny_gemma3_path, tmp_path, kind):
    """The merged model is the trained one either way. peft's own merge_and_unload folds an embedding or head
    update into the one tensor both share, which changes the other too: it is not the oracle here."""
    fields, tied = HEAD_KINDS[kind]
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", **fields)
    model = _adapter(tiny_gemma3_path, tmp_path / "adapter", lora=lora)
    reference = _logits(model, _ids(tiny_gemma3_path))

    result = merge_to_fp16(tiny_gemma3_path, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    assert result.tied_head is tied
    assert ("lm_head.weight" in _tensors(tmp_path / "merged")) is not tied
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is tied
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (merged.lm_head.weight is merged.get_input_embeddings().weight) is tied
    torch.testing.assert_close(_logits(merged, _ids(tiny_gemma3_path)), reference, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A QLoRA adapter as `trainer.save_model()` writes it (tokenizer and base_loading.json included), 2 steps."""
    base = build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma3-bf16"), "gemma3", dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapter = tmp_path_factory.mktemp("adapter")
    config = TrainConfig(
        output_dir=str(adapter),
        learning_rate=2e-2,
        warmup_steps=0,
        max_steps=2,
        gradient_accumulation_steps=1,
        extra={"disable_tqdm": True, "save_strategy": "no"},
    )
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    trainer = make_trainer(build_qlora_model(base), tokenizer, [dataset[i] for i in range(8)], config=config)
    trainer.train()
    trainer.save_model()
    return base, adapter


def test_a_trained_adapter_merges_to_bf16_with_its_tokenizer_card_and_verify(trained, tmp_path):
    base, adapter = trained
    adapter = shutil.copytree(adapter, tmp_path / "adapter")
    (adapter / "chat_template.jinja").write_text((adapter / "chat_template.jinja").read_text() + "\n")  # its own
    result = merge_to_fp16(base, adapter, tmp_path / "merged", merge_base="nf4", verify=True, max_shard_size="100KB")
    out = tmp_path / "merged"
    assert result.dtype == torch.bfloat16 and result.max_abs_logit_diff < 1e-2
    assert result.update_rounding is not None and 0 < result.update_rounding < 1
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # training's tokenizer wins
        assert (out / name).read_bytes() == (adapter / name).read_bytes()
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "- fa" in card and "r=8, alpha=16" in card and "`nf4`" in card
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and merged.lm_head.weight is merged.get_input_embeddings().weight


def test_verify_tensors_rereads_every_tensor_and_refuses_a_bad_write(tiny_gemma3_path, tmp_path, monkeypatch):
    """The per-tensor check, in the merge's memory: how much of each update bf16 keeps, and a write that is not what
    was computed (here one value of one tensor changed on its way to disk) refused, leaving nothing behind."""
    from persian_qlora._shards import ShardWriter

    _adapter(tiny_gemma3_path, tmp_path / "lora")
    result = merge_to_fp16(tiny_gemma3_path, tmp_path / "lora", tmp_path / "bf16", verify="tensors")
    assert result.max_abs_logit_diff is None and 0 < result.update_rounding < 0.1
    exact = merge_to_fp16(tiny_gemma3_path, tmp_path / "lora", tmp_path / "fp32", verify="tensors", dtype=torch.float32)
    assert exact.update_rounding == 0

    write = ShardWriter.write

    def faulty(self, name, data):
        if name == "model.layers.1.mlp.up_proj.weight" and isinstance(data, torch.Tensor):
            data = data.clone()
            data.view(-1)[7] += 1
        write(self, name, data)

    monkeypatch.setattr(ShardWriter, "write", faulty)
    with pytest.raises(PersianQLoRAError, match=r"verify: model.layers.1.mlp.up_proj.weight .* is not what was"):
        merge_to_fp16(tiny_gemma3_path, tmp_path / "lora", tmp_path / "faulty", verify="tensors")
    assert not (tmp_path / "faulty").exists()


def test_an_adapter_without_base_loading_json_still_merges(trained, tmp_path, caplog):
    """Older adapters: the original base merges (names tell how the base was loaded); NF4 needs quant_dtype."""
    base, adapter = trained
    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    (old / PROVENANCE_FILE).unlink()
    merge_to_fp16(base, old, tmp_path / "original")
    assert "has no base_loading.json" in caplog.text
    with pytest.raises(PersianQLoRAError, match="no base_loading.json.*pass quant_dtype"):
        merge_to_fp16(base, old, tmp_path / "nf4", merge_base="nf4")
    merge_to_fp16(base, old, tmp_path / "nf4", merge_base="nf4", quant_dtype=torch.float32, dtype=torch.float32)
    merge_to_fp16(base, adapter, tmp_path / "recorded", merge_base="nf4", dtype=torch.float32)
    assert all(_identical(t, _tensors(tmp_path / "recorded")[n]) for n, t in _tensors(tmp_path / "nf4").items())


def _dora(base, directory):
    lora = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    return _adapter(base, directory, lora=lora)


def _loha(base, directory):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoHaConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(directory)


def _lora_bias(base, directory):
    return _adapter(base, directory, lora_bias=True)


def _vision_tower_lora(base, directory):
    lora = LoraConfig(r=4, target_modules=r".*vision_tower.*q_proj", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    model.save_pretrained(directory)


@pytest.mark.parametrize(
    ("make", "fixture", "match"),
    [
        (_dora, "tiny_gemma3_path", "DoRA"),
        (_loha, "tiny_gemma3_path", "LOHA adapter; merge_to_fp16 folds LoRA adapters only"),
        (_lora_bias, "tiny_gemma3_path", r"LoRA biases \(lora_bias=True\)"),
        (_vision_tower_lora, "tiny_gemma3_vision_hub_path", "outside the language model"),
    ],
    ids=["dora", "loha", "lora-bias", "vision-tower"],
)
def test_other_adapter_kinds_are_refused_by_name(request, tmp_path, make, fixture, match):
    base = request.getfixturevalue(fixture)
    make(base, tmp_path / "adapter")
    with pytest.raises(PersianQLoRAError, match=match):
        merge_to_fp16(base, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_mismatches_with_the_record_or_the_checkpoint_are_refused(tiny_gemma3_path, tiny_gemma3n_path, tmp_path):
    _adapter(tiny_gemma3_path, tmp_path / "lora")
    with pytest.raises(PersianQLoRAError, match="trained on a 16-bit base.*use merge_base='original'"):
        merge_to_fp16(tiny_gemma3_path, tmp_path / "lora", tmp_path / "out", merge_base="nf4")
    with pytest.raises(PersianQLoRAError, match="trained on a gemma3_text checkpoint.*but this base is gemma3n_text"):
        merge_to_fp16(tiny_gemma3n_path, tmp_path / "lora", tmp_path / "out")

    _adapter(tiny_gemma3_path, tmp_path / "qlora", build_qlora_model)
    with pytest.raises(PersianQLoRAError, match="quant_dtype=torch.bfloat16 contradicts .* from torch.float32"):
        merge_to_fp16(
            tiny_gemma3_path, tmp_path / "qlora", tmp_path / "out", merge_base="nf4", quant_dtype=torch.bfloat16
        )

    deeper = build_tiny_gemma(tmp_path / "deeper", "gemma3", num_hidden_layers=3, layer_types=["full_attention"] * 3)
    _adapter(deeper, tmp_path / "deeper-lora")
    with pytest.raises(PersianQLoRAError, match=r"weights the checkpoint does not have: \['model.layers.2"):
        merge_to_fp16(tiny_gemma3_path, tmp_path / "deeper-lora", tmp_path / "out")
    wider = build_tiny_gemma(tmp_path / "wider", "gemma3", hidden_size=128)
    _adapter(wider, tmp_path / "wider-lora")
    with pytest.raises(PersianQLoRAError, match=r"changes .* as a \(.*\) tensor, but the checkpoint's tensor is"):
        merge_to_fp16(tiny_gemma3_path, tmp_path / "wider-lora", tmp_path / "out")
    with pytest.raises(ValueError, match="dtype must be"):
        merge_to_fp16(tiny_gemma3_path, tmp_path / "lora", tmp_path / "out", dtype=torch.float64)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
def test_a_truncated_base_is_refused(tiny_gemma3_path, tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:
        monkeypatch.delattr("os.copy_file_range", raising=False)
    _adapter(tiny_gemma3_path, tmp_path / "lora")
    cut = shutil.copytree(tiny_gemma3_path, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(PersianQLoRAError, match="is truncated: tensor .* is incomplete"):
        merge_to_fp16(cut, tmp_path / "lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_without_safetensors_is_refused(tiny_gemma3_path, tmp_path):
    _adapter(tiny_gemma3_path, tmp_path / "lora")
    pickled = shutil.copytree(tiny_gemma3_path, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_gemma3_path).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(PersianQLoRAError, match="reads safetensors only"):
        merge_to_fp16(pickled, tmp_path / "lora", tmp_path / "out")


def test_fp16_is_made_on_request_and_refused_when_its_forward_overflows(tiny_gemma3_path, tmp_path):
    _adapter(tiny_gemma3_path, tmp_path / "lora")
    result = merge_to_fp16(tiny_gemma3_path, tmp_path / "lora", tmp_path / "fp16", dtype=torch.float16)
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in _tensors(result.output_dir).values())

    # A base whose residual stream outgrows fp16's range (65504), finite in bf16: as Gemma's activations do.
    loud = tmp_path / "loud"
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight.fill_(3e4)
    model.save_pretrained(loud)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_gemma3_path / name, loud)
    with pytest.raises(PersianQLoRAError, match="fp16 forward .* inf/NaN .* Merge into bf16"):
        merge_to_fp16(loud, tmp_path / "lora", tmp_path / "loud-fp16", dtype=torch.float16)
    assert not (tmp_path / "loud-fp16").exists()
    merge_to_fp16(loud, tmp_path / "lora", tmp_path / "loud-bf16")


@pytest.mark.parametrize(
    ("value", "dtype", "match"),
    [
        (float("nan"), torch.bfloat16, "is not finite in fp32; the adapter or the base is broken"),
        (1e6, torch.float16, "values overflow torch.float16 when cast; use dtype=torch.bfloat16"),
    ],
)
def test_a_weight_that_is_not_finite_or_overflows_the_output_dtype_is_refused(
    tiny_gemma3_path, tmp_path, value, dtype, match
):
    from safetensors.torch import load_file, save_file

    _adapter(tiny_gemma3_path, tmp_path / "lora")
    weights_file = tmp_path / "lora" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    name = next(n for n in weights if "q_proj.lora_B" in n)
    weights[name] = torch.full_like(weights[name], value)
    save_file(weights, weights_file)
    with pytest.raises(PersianQLoRAError, match=match):
        merge_to_fp16(tiny_gemma3_path, tmp_path / "lora", tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_asked(trained, tmp_path):
    base, adapter = trained
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PersianQLoRAError, match="already exists"):
        merge_to_fp16(base, adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_to_fp16(base, adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_failed_merge_leaves_nothing_that_looks_complete(trained, tmp_path, monkeypatch):
    base, adapter = trained

    def broken_card(**kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("persian_qlora.merging.render_model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        merge_to_fp16(base, adapter, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_merge_checks_free_disk_space_before_writing(trained, tmp_path, monkeypatch):
    base, adapter = trained
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(PersianQLoRAError, match=r"not enough disk space .* needs about .* GiB and 0.00 GiB are free"):
        merge_to_fp16(base, adapter, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_model_card_has_valid_hub_metadata(trained, tmp_path):
    from huggingface_hub import ModelCard

    base, adapter = trained
    merge_to_fp16(base, adapter, tmp_path / "m", datasets=["mshojaei77/persian-gk"], metrics={"final_loss": 1.25})
    card = ModelCard.load(tmp_path / "m" / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == str(base) and data["language"] == ["fa"] and data["license"] == "gemma"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"persian", "lora", "persian-qlora"} <= set(data["tags"]) and data["datasets"] == ["mshojaei77/persian-gk"]
    assert "| final_loss | 1.25 |" in card.text and "Gemma Terms of Use" in card.text


def test_push_to_hub_is_refused_offline_and_leaves_the_model(trained, tmp_path, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from persian_qlora.merging import push_to_hub

    base, adapter = trained
    out = merge_to_fp16(base, adapter, tmp_path / "m").output_dir
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled):
        push_to_hub(out, "someone/persian-gemma")
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(PersianQLoRAError, match="no README.md model card"):
        push_to_hub(tmp_path, "someone/persian-gemma")


def test_the_output_folder_and_files_are_readable_as_mkdir_and_open_make_them(trained, tmp_path):
    """A serving container or another user reads the merged model: the umask decides, not mkdtemp's 0o700."""
    base, adapter = trained
    merge_to_fp16(base, adapter, tmp_path / "merged")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~umask
    for path in (tmp_path / "merged").iterdir():
        assert path.stat().st_mode & 0o444 == 0o444 & ~umask, path


def test_every_written_file_and_the_folders_are_flushed_to_disk(trained, tmp_path, monkeypatch):
    """Index, config, card and copied files too, not only the shards; and the parent folder after the rename."""
    base, adapter = trained
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    merge_to_fp16(base, adapter, tmp_path / "merged", max_shard_size="100KB")
    out = tmp_path / "merged"
    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors.index.json", "config.json", "README.md", "tokenizer.json"} <= names
    flushed = {Path(path).name for path in synced}  # the staging folder's names: the files before the rename
    assert names <= flushed, names - flushed
    assert str(tmp_path) in synced  # the rename, recorded in the parent folder
    last_staging = max(i for i, path in enumerate(synced) if ".partial-" in Path(path).name)
    assert synced.index(str(tmp_path), last_staging) > last_staging  # after the rename


def test_an_untied_head_stays_untied_when_the_base_config_leaves_tying_to_its_default(tmp_path):
    """tie_word_embeddings defaults to true: a config without the key says the written head is the embedding.
    transformers 5.25 happens to keep two differing tensors apart (with a warning), but a reader that goes by the
    config (the GGUF export, older transformers, other runtimes) re-ties them."""
    base = build_tiny_gemma(tmp_path / "base", "gemma3")
    config = json.loads((base / "config.json").read_text())
    del config["tie_word_embeddings"]
    (base / "config.json").write_text(json.dumps(config))
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", target_modules=r".*lm_head")
    model = _adapter(base, tmp_path / "adapter", lora=lora)
    result = merge_to_fp16(base, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    assert result.tied_head is False
    assert AutoConfig.from_pretrained(tmp_path / "merged").tie_word_embeddings is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    torch.testing.assert_close(_logits(merged, _ids(base)), _logits(model, _ids(base)), rtol=1e-5, atol=1e-4)


def test_comparing_two_whole_trained_modules_reads_a_block_at_a_time(tmp_path, monkeypatch):
    """Replaced.same_as (is a head trained whole the same as the embedding?) holds one block of each, not both
    whole tensors in fp32 (5.4 GB for Gemma 3 4B's head)."""
    from safetensors.torch import save_file

    import persian_qlora._adapter_edits as edits
    from persian_qlora._shards import read_safetensors_file

    torch.manual_seed(0)
    head = torch.randn(64, 32)
    other = head.clone()
    other[-1, -1] += 1  # differs in its last row only
    save_file({"head": head, "same": head.clone(), "other": other}, tmp_path / "t.safetensors")
    stored = read_safetensors_file(tmp_path / "t.safetensors")
    monkeypatch.setattr(edits, "COPY_CHUNK", 8 * 32 * 4)  # blocks of 8 fp32 rows
    read_rows, read_tensor = [], edits.read_tensor

    def recording_read(tensor, rows=None):
        read_rows.append(tensor.shape[0] if rows is None else rows.stop - rows.start)
        return read_tensor(tensor, rows)

    monkeypatch.setattr(edits, "read_tensor", recording_read)
    assert edits.Replaced(stored["head"], "a").same_as(edits.Replaced(stored["same"], "b"))
    assert max(read_rows) == 8 and sum(read_rows) == 2 * 64
    assert not edits.Replaced(stored["head"], "a").same_as(edits.Replaced(stored["other"], "b"))


def test_a_base_other_than_the_recorded_one_is_warned_about_or_refused_under_strict(tmp_path, caplog):
    """A -pt base instead of the -it one the adapter was trained on has the same shape: only the record tells."""
    base = build_tiny_gemma(tmp_path / "gemma-it", "gemma3")
    _adapter(base, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / PROVENANCE_FILE).read_text())["base_config_hash"]
    with caplog.at_level("WARNING", logger="persian_qlora"):
        merge_to_fp16(base, tmp_path / "adapter", tmp_path / "same", strict=True)
    assert "may not belong" not in caplog.text

    other = shutil.copytree(base, tmp_path / "gemma-pt")  # another name, the same config
    with caplog.at_level("WARNING", logger="persian_qlora"):
        merge_to_fp16(other, tmp_path / "adapter", tmp_path / "renamed")
    assert "may not belong to this base: it was trained on" in caplog.text
    with pytest.raises(PersianQLoRAError, match="trained on .*gemma-it.*, not .*gemma-pt.*pass strict=False"):
        merge_to_fp16(other, tmp_path / "adapter", tmp_path / "refused", strict=True)

    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # same name, another config
    caplog.clear()
    with caplog.at_level("WARNING", logger="persian_qlora"):
        merge_to_fp16(base, tmp_path / "adapter", tmp_path / "reconfigured")
    assert "config differs from the config of the base it was trained on" in caplog.text
    with pytest.raises(PersianQLoRAError, match="config differs"):
        merge_to_fp16(base, tmp_path / "adapter", tmp_path / "refused", strict=True)
    assert not (tmp_path / "refused").exists()
