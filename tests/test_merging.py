"""merge_to_fp16: both merge bases, fidelity to base+adapter, what is written, and atomic, refusing writes."""

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from persian_qlora import PersianChatDataset, PersianQLoRAError
from persian_qlora.merging import merge_to_fp16
from persian_qlora.modeling import build_qlora_model
from persian_qlora.testing import build_tiny_gemma
from persian_qlora.training import TrainConfig, make_trainer

# fp16 weights against the fp32 base+adapter: measured max |Δlogit| is about 1e-3 on the tiny models.
LOGIT_TOLERANCE = 1e-2


def _train_hard(base, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapter = tmp_path_factory.mktemp("adapter")
    config = TrainConfig(
        output_dir=str(adapter),
        learning_rate=2e-2,
        warmup_steps=0,
        max_steps=5,
        gradient_accumulation_steps=1,
        extra={"disable_tqdm": True, "save_strategy": "no"},
    )
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    trainer = make_trainer(build_qlora_model(base), tokenizer, dataset, config=config)
    trainer.train()
    trainer.save_model()
    return base, adapter


@pytest.fixture(scope="module", params=["tiny_gemma3_path", "tiny_gemma3n_path"])
def trained(request, tmp_path_factory):
    """A base and a QLoRA adapter trained hard enough that merging it changes the logits."""
    return _train_hard(request.getfixturevalue(request.param), tmp_path_factory)


@pytest.fixture(scope="module")
def trained_on_bf16_checkpoint(tmp_path_factory):
    """As ``trained``, from a checkpoint stored in bf16 (as real Gemma is) and quantised from fp32 on CPU."""
    base = build_tiny_gemma(tmp_path_factory.mktemp("bf16-base"), "gemma3", dtype=torch.bfloat16)
    return _train_hard(base, tmp_path_factory)


def _logits(model, tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ایران کجاست؟"}, {"role": "assistant", "content": "در غرب آسیا."}],
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("merge_base", ["original", "nf4"])
def test_merged_model_matches_base_plus_adapter(trained, tmp_path, merge_base):
    base, adapter = trained
    result = merge_to_fp16(base, adapter, tmp_path / "merged", merge_base=merge_base, verify=True)
    assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff < LOGIT_TOLERANCE

    out = tmp_path / "merged"
    weights = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    assert weights and all(name.endswith(".safetensors") for name in weights)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "- fa" in card and "r=8, alpha=16" in card
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float16
    assert merged.lm_head.weight is merged.get_input_embeddings().weight  # Gemma's tied embedding stays tied
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        assert not any(key.startswith("lm_head") for key in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def test_nf4_merge_reproduces_the_trained_qlora_model_best(trained, tmp_path):
    """The NF4 base reproduces what QLoRA trained (4-bit base + adapter); the original base carries the NF4 error.

    Merged in fp32 here, so that fp16 rounding does not hide the difference between the two bases.
    """
    _assert_nf4_merge_is_the_trained_model(*trained, tmp_path)


def test_a_bf16_checkpoint_is_requantised_as_training_loaded_it(trained_on_bf16_checkpoint, tmp_path):
    """Real Gemma is stored in bf16 and QLoRA on CPU quantises its fp32 copy: the NF4 merge must do the same."""
    _assert_nf4_merge_is_the_trained_model(*trained_on_bf16_checkpoint, tmp_path)


def _assert_nf4_merge_is_the_trained_model(base, adapter, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base)
    from persian_qlora.modeling import default_bnb_config

    qlora = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=default_bnb_config(torch.float32)
    )
    for module in qlora.modules():  # as build_qlora_model does: no bf16 repacking on AVX512-BF16 CPUs
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    reference = _logits(PeftModel.from_pretrained(qlora, adapter), tokenizer)
    errors = {}
    for merge_base in ("original", "nf4"):
        merge_to_fp16(base, adapter, tmp_path / merge_base, merge_base=merge_base, dtype=torch.float32)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / merge_base, dtype=torch.float32)
        errors[merge_base] = float((_logits(merged, tokenizer) - reference).abs().max())
    assert errors["nf4"] < 1e-4, errors  # fp32 output: the NF4 merge is exact up to float rounding
    assert errors["original"] > 100 * errors["nf4"], errors


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
