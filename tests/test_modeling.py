"""build_qlora_model / build_lora_model on tiny Gemma 3, Gemma 3n and multimodal Gemma 3."""

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from transformers import AutoTokenizer

from persian_qlora import GemmaChatCollator, PersianChatDataset, PersianQLoRAError
from persian_qlora.modeling import build_lora_model, build_qlora_model, resolve_dtype

TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _lora_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("fixture", ["tiny_gemma3_path", "tiny_gemma3n_path"])
def test_qlora_targets_are_nf4_double_quantized_and_only_lora_trains(request, fixture):
    model = build_qlora_model(request.getfixturevalue(fixture))
    layers = _lora_layers(model)
    assert {name.rsplit(".", 1)[-1] for name in layers} == TARGETS
    assert len(layers) == 7 * 2  # 7 projections in each of the 2 layers
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit), name
        state = base.weight.quant_state
        assert state.quant_type == "nf4" and state.nested, name
        assert base.support_avx512bf16_for_cpu is False
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert model.base_model.model.is_gradient_checkpointing


def test_gemma3n_altup_and_lm_head_stay_unquantized(tiny_gemma3n_path):
    model = build_qlora_model(tiny_gemma3n_path)
    for name, module in model.named_modules():
        if name.endswith(("correction_coefs", "prediction_coefs", "modality_router", "lm_head")):
            assert type(module) is torch.nn.Linear, name


def test_no_adapter_on_the_vision_tower_of_a_whole_model(tiny_gemma3_vision_path):
    for builder in (build_qlora_model, build_lora_model):
        layers = _lora_layers(builder(tiny_gemma3_vision_path, text_only=False))
        assert len(layers) == 14
        assert all(".language_model." in name for name in layers), sorted(layers)
    # A user's LoraConfig with short names is confined to the language model too.
    custom = build_lora_model(
        tiny_gemma3_vision_path, text_only=False, lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    assert all(".language_model." in name for name in _lora_layers(custom))


@pytest.mark.parametrize("fixture", ["tiny_gemma3_path", "tiny_gemma3n_path"])
def test_preparation_never_upcasts_embeddings(request, fixture):
    model = build_qlora_model(request.getfixturevalue(fixture), dtype=torch.bfloat16)
    embeddings = {n: p.dtype for n, p in model.named_parameters() if "embed_tokens" in n}
    assert embeddings and set(embeddings.values()) == {torch.bfloat16}, embeddings
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_fp16_is_refused_for_gemma(tiny_gemma3_path):
    with pytest.raises(PersianQLoRAError, match="fp16 compute is refused"):
        build_qlora_model(tiny_gemma3_path, dtype=torch.float16)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), torch.float32), ((7, 0), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
    ids=["T4", "V100", "A100", "H100"],
)
def test_gpus_without_native_bf16_compute_in_fp32(monkeypatch, capability, expected):
    """A T4 reports bf16 as supported (emulated), so the choice must come from the compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype() == expected


def test_the_cpu_computes_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype() == torch.float32


@pytest.mark.parametrize("builder", [build_qlora_model, build_lora_model], ids=["qlora", "lora"])
def test_training_after_generation_still_updates_every_lora_layer(tiny_gemma3_path, builder):
    """On AVX512-BF16 CPUs a no-grad 4-bit forward used to repack weights, after which gradients skipped them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    model = builder(tiny_gemma3_path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    batch = GemmaChatCollator(tokenizer)([dataset[0], dataset[1]])
    layer = next(iter(_lora_layers(model).values())).get_base_layer()
    before = _weight_of(layer)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=batch["input_ids"][:1, :16], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(_weight_of(layer), before)
    model.train()
    for p in model.parameters():
        p.grad = None
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def _weight_of(layer):
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    return layer.weight.detach().clone()


def test_quant_storage_for_fsdp_qlora(tiny_gemma3_path):
    from persian_qlora.modeling import default_bnb_config

    config = default_bnb_config(torch.bfloat16, quant_storage="bfloat16")
    assert (
        config.bnb_4bit_quant_storage == torch.bfloat16 and default_bnb_config().bnb_4bit_quant_storage == torch.uint8
    )
    model = build_qlora_model(tiny_gemma3_path, bnb_config=config, dtype=torch.bfloat16)
    packed = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    assert packed == {torch.bfloat16}  # every parameter now shares one dtype, as FSDP needs


def test_accelerate_configs_load(tmp_path):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((Path(__file__).parents[1] / "examples" / "accelerate").glob("*.yaml"))
    assert [c.stem for c in configs] == ["ddp", "deepspeed_zero2", "fsdp_qlora"]
    kinds = {c.stem: load_config_from_file(str(c)).distributed_type.name for c in configs}
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp_qlora": "FSDP"}


def test_the_tokenizer_is_found_where_the_model_is(tiny_gemma3_path, tmp_path):
    # A checkpoint in a repository's subfolder: the tokenizer must be read with the same hub arguments as the weights
    # (token, revision, cache_dir and subfolder alike), not from the repository's root.
    import shutil

    shutil.copytree(tiny_gemma3_path, tmp_path / "model")
    model = build_lora_model(str(tmp_path), subfolder="model")
    assert model.base_loading.base == str(tmp_path)
