"""Loading the seed's own kind of checkpoint: multimodal Gemma 3 / 3n in the hub's layout, text-only by default."""

import json
import re
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3nForCausalLM, Gemma4ForCausalLM

from persian_qlora import PersianChatDataset, PersianQLoRAError
from persian_qlora.errors import MissingExtraError
from persian_qlora.families import FAMILIES, family_of
from persian_qlora.generation import evaluation_pairs, generate, load_for_inference
from persian_qlora.loading import PROVENANCE_FILE, load_base, offload_per_layer_embeddings, read_provenance
from persian_qlora.modeling import build_lora_model, build_qlora_model
from persian_qlora.pytest_plugin import multimodal
from persian_qlora.training import TrainConfig, make_trainer

HUB = {
    "tiny_gemma3_vision_hub_path": (Gemma3ForCausalLM, ("vision_tower", "multi_modal_projector")),
    "tiny_gemma3n_multimodal_hub_path": (
        Gemma3nForCausalLM,
        ("vision_tower", "audio_tower", "embed_vision", "embed_audio"),
    ),
    "tiny_gemma4_multimodal_hub_path": (
        Gemma4ForCausalLM,
        ("vision_tower", "audio_tower", "embed_vision", "embed_audio"),
    ),
}
HUB_FIXTURES = [
    "tiny_gemma3_vision_hub_path",
    pytest.param("tiny_gemma3n_multimodal_hub_path", marks=multimodal),
    "tiny_gemma4_multimodal_hub_path",
]


def _model_type(path):
    return json.loads((path / "config.json").read_text())["model_type"]


def _text_weights(path):
    """The checkpoint's language-model tensors, under the names of the text-only model."""
    family = FAMILIES[_model_type(path)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                for pattern, replacement in family.text_weight_names:
                    if re.match(pattern, key):
                        weights[re.sub(pattern, replacement, key)] = f.get_tensor(key)
    return weights


@pytest.mark.parametrize("fixture", HUB_FIXTURES)
@pytest.mark.parametrize("builder", [build_qlora_model, build_lora_model], ids=["qlora", "lora"])
def test_a_multimodal_checkpoint_loads_its_language_model_alone(request, fixture, builder):
    path = request.getfixturevalue(fixture)
    text_class, towers = HUB[fixture]
    model = builder(path)
    base = model.get_base_model()
    assert type(base) is text_class
    assert not [n for n, _ in base.named_parameters() if any(t in n for t in towers)]
    assert model.base_loading.text_only and model.base_loading.model_type == _model_type(path)
    if builder is build_qlora_model:
        assert model.base_loading.quantization["blocksize"] == 64 and model.base_loading.quantization["double_quant"]
        return
    # Every language-model weight is the checkpoint's own, under its text-only name; nothing else was loaded.
    expected = _text_weights(path)
    loaded = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert torch.equal(loaded.pop("lm_head.weight"), loaded["model.embed_tokens.weight"])  # tied, not stored
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("fixture", HUB_FIXTURES)
def test_the_whole_model_keeps_its_towers_frozen_unquantised_and_without_lora(request, fixture):
    path = request.getfixturevalue(fixture)
    _, towers = HUB[fixture]
    model = build_qlora_model(path, text_only=False)
    assert type(model.get_base_model()).__name__ == FAMILIES[_model_type(path)].causal_lm_class
    tower_modules = {n: m for n, m in model.named_modules() if any(f".{t}." in f".{n}." for t in towers)}
    assert tower_modules
    assert not [n for n, m in tower_modules.items() if isinstance(m, (bnb.nn.Linear4bit, LoraLayer))]
    assert not [n for n, p in model.named_parameters() if p.requires_grad and any(t in n for t in towers)]
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(".language_model." in n for n in quantised)
    assert not model.base_loading.text_only


@pytest.mark.parametrize("fixture", HUB_FIXTURES)
def test_a_text_only_adapter_trains_saves_its_provenance_and_generates(request, fixture, tmp_path):
    path = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    model = build_qlora_model(path)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, learning_rate=1e-2, warmup_steps=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(model, tokenizer, [dataset[i] for i in range(8)], config=config)
    trainer.train()
    trainer.save_model()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before)

    record = read_provenance(tmp_path / "run")
    assert record == model.base_loading
    saved = json.loads((tmp_path / "run" / PROVENANCE_FILE).read_text())
    assert saved["text_only"] is True and saved["quantization"]["quant_type"] == "nf4"
    assert saved["load_dtype"] == "float32" and saved["versions"]["transformers"]

    # Inference loads the base the way the adapter was trained (text-only), and refuses the other way.
    loaded, loaded_tokenizer = load_for_inference(path, tmp_path / "run")
    assert type(loaded.get_base_model()) is HUB[fixture][0]
    prompts, _ = evaluation_pairs(dataset.conversations[:2])
    result = generate(loaded, loaded_tokenizer, prompts, max_new_tokens=4)
    assert len(result.texts) == 2 and all(n > 0 for n in result.new_tokens)
    with pytest.raises(PersianQLoRAError, match="text_only=True"):
        load_for_inference(path, tmp_path / "run", text_only=False)


_WITHOUT_TIMM = """
import sys
sys.modules["timm"] = None  # `import timm` now raises ImportError, as where timm is not installed
from persian_qlora.errors import MissingExtraError
from persian_qlora.modeling import build_qlora_model
model = build_qlora_model(sys.argv[1])
print(type(model.get_base_model()).__name__)
try:
    build_qlora_model(sys.argv[1], text_only=False)
except MissingExtraError as err:
    print("refused:", err)
"""


@multimodal
def test_gemma3n_text_only_needs_no_timm(tiny_gemma3n_multimodal_hub_path):
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TIMM, str(tiny_gemma3n_multimodal_hub_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "Gemma3nForCausalLM"
    assert lines[1].startswith("refused:") and "persian-qlora[multimodal]" in lines[1] and "timm" in lines[1]


def test_missing_extra_error_names_the_extra():
    err = MissingExtraError("loading the whole gemma3n model", "multimodal", "timm")
    assert "pip install 'persian-qlora[multimodal]'" in str(err)


@pytest.mark.parametrize(
    "fixture",
    [
        "tiny_gemma3n_path",
        pytest.param("tiny_gemma3n_multimodal_hub_path", marks=multimodal),
        "tiny_gemma4_path",
        "tiny_gemma4_multimodal_hub_path",
    ],
)
def test_per_layer_embeddings_on_the_host_give_the_same_logits(request, fixture):
    """Only the looked-up rows travel; the logits are those of the model held in one place."""
    path = request.getfixturevalue(fixture)
    ids = torch.tensor([[2, 105, 300, 1200, 7, 1999, 106]])
    reference, _ = load_base(path, per_layer_embeddings_on_host=False)
    model, record = load_base(path, per_layer_embeddings_on_host=True)
    assert record.per_layer_embeddings_on_host
    table = model.get_decoder().embed_tokens_per_layer
    assert model.hf_device_map["model.embed_tokens_per_layer"] == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert table.weight.device.type == "cpu"


def test_per_layer_embeddings_can_be_stored_narrower_on_the_host(tiny_gemma3n_path):
    """A bf16 checkpoint loaded in fp32 (a T4) keeps its 2.35 B table rows in bf16 on the host, exactly."""
    model, _ = load_base(tiny_gemma3n_path, per_layer_embeddings_on_host=False)
    table = model.get_decoder().embed_tokens_per_layer
    table.weight.data = table.weight.data.bfloat16().float()  # the values a bf16 checkpoint holds
    ids = torch.tensor([[2, 105, 300, 1200, 7, 1999, 106]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        assert offload_per_layer_embeddings(model, storage_dtype=torch.bfloat16) == ["model.embed_tokens_per_layer"]
        assert table.weight.dtype == torch.bfloat16
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)


def test_per_layer_embeddings_stay_in_place_for_families_without_them(tiny_gemma3_path):
    model, record = load_base(tiny_gemma3_path, per_layer_embeddings_on_host=True)
    assert not record.per_layer_embeddings_on_host and getattr(model, "hf_device_map", None) is None


def test_every_family_names_real_classes_and_its_text_family():
    import transformers

    for name, family in FAMILIES.items():
        assert family.model_type == name
        assert isinstance(family.model_class(), type) and hasattr(transformers, family.causal_lm_class)
        text = family.text()
        assert not text.multimodal and text.towers == ()
        assert set(text.full_precision) <= set(family.never_quantised)
        assert {family.turns.start_of_turn, family.turns.end_of_turn} <= set(family.reserved)
        assert set(family.turns.media) <= set(family.reserved)
    assert FAMILIES["gemma3n"].text().per_layer_embeddings == ("embed_tokens_per_layer",)
    assert FAMILIES["gemma3"].needs_token_type_ids and not FAMILIES["gemma3_text"].needs_token_type_ids


def test_an_unknown_family_is_refused_by_name():
    from transformers import LlamaConfig

    with pytest.raises(PersianQLoRAError, match="'llama' is not a Gemma family"):
        family_of(LlamaConfig())


@pytest.mark.parametrize("quantized", [False, True], ids=["16-bit", "nf4"])
@pytest.mark.parametrize("fixture", ["tiny_gemma3n_path", "tiny_gemma4_path"])
def test_per_layer_embeddings_are_loaded_onto_the_host_and_nothing_else_is(request, fixture, quantized):
    """The meta device stands in for the accelerator: every parameter found on the host was put there by the load
    itself (a table loaded onto the accelerator and moved afterwards could not be: a meta tensor holds no data)."""
    from persian_qlora.loading import default_bnb_config

    bnb_config = default_bnb_config() if quantized else None
    model, record = load_base(
        request.getfixturevalue(fixture),
        per_layer_embeddings_on_host=True,
        device_map={"": "meta"},
        quantization_config=bnb_config,
    )
    placed = {name: parameter.device.type for name, parameter in model.named_parameters()}
    on_host = {name for name, device in placed.items() if device == "cpu"}
    assert on_host == {"model.embed_tokens_per_layer.weight"}
    assert set(placed.values()) == {"cpu", "meta"} and record.per_layer_embeddings_on_host
    assert model.hf_device_map["model.embed_tokens_per_layer"] == "cpu"
    assert not [name for name, module in model.named_modules() if hasattr(module, "_hf_hook")]  # no accelerate offload
    assert bnb_config is None or not bnb_config.llm_int8_enable_fp32_cpu_offload  # the caller's config is untouched
