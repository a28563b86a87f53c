"""export_gguf on Gemma 4, as llama.cpp's ``gemma4`` architecture: what the file holds as llama.cpp reads it, what
is refused and why, and (the ``llama`` marker) the file inside llama.cpp against transformers: token ids on Persian
text, logits per quantisation, the turn end, the multimodal checkpoint's language model."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export import (
    K_QUANTS,
    LLAMA_REASON,
    PERSIAN_TEXTS,
    PROBE_TEXTS,
    _fields,
    _llama,
    _llama_cpp_logit_error,
    assert_llama_cpp_ends_the_turn_where_transformers_does,
    make_the_turn_end_win,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import persian_qlora.export as export_module
from persian_qlora import PersianChatDataset, PersianQLoRAError
from persian_qlora._gguf_gemma4 import FULL, SLIDING
from persian_qlora.export import export_gguf
from persian_qlora.families import FAMILIES, GEMMA4_TURNS
from persian_qlora.testing import build_hub_checkpoint, build_tiny_gemma

gguf = pytest.importorskip("gguf")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# Bounds on llama.cpp's error as a share of the checkpoint's largest |logit| over eight bundled test conversations
# (transformers in fp32). Measured on the tiny Gemma 4 below (largest |logit| 0.835; AMD EPYC, llama-cpp-python
# 0.3.36): bf16 1.4e-2 (llama.cpp rounds the activations to bf16 for bf16 weights, and keeps keys and values in
# f16: the f16 file, 11 bits of mantissa against bf16's 8, is 7 times closer), f16 2.0e-3, q8_0 7.0e-2 (8-bit
# weights, activations rounded to 8 bits for the dot products), q4_0 0.55 (4 bits hold little of a random tiny
# model's structureless weights). The multimodal checkpoint's bf16 file, its fp32 weights rounded too: 2.1e-2. With
# F32 weights and an F32 cache (a file this export does not offer) the error is 6.7e-4: the file is the model.
# The k-quants, by llama.cpp's own quantizer: q4_k_m 0.34, q5_k_m 0.32, q6_k 6.6e-2; the tiny model's rows of 64 or
# 128 weights are shorter than a k-quant block (256), so most weights hold the mix's 32-block fallback types, as in
# Gemma 3's test; the bounds are Gemma 3's.
LLAMA_LOGIT_SHARE = {"bf16": 3e-2, "f16": 5e-3, "q8_0": 0.1, "q4_0": 0.75, "q4_k_m": 0.5, "q5_k_m": 0.4, "q6_k": 0.15}
WRITTEN_HERE = ("bf16", "f16", "q8_0", "q4_0")  # by gguf's writer; the k-quants need llama.cpp's quantizer
# Gemma 3's probes with Gemma 4's turn marker in place of Gemma 3's.
GEMMA4_PROBES = [*PROBE_TEXTS[:-1], f"{GEMMA4_TURNS.start_of_turn}user\nسلام{GEMMA4_TURNS.end_of_turn}\n"]


def _vary_the_vectors(path, seed=0):
    """A fresh tiny model's norms and layer scalars are all ones, so a file that stored 1 + w, or read one norm in
    place of another, would still run the same: give each language-model vector its own values near 1. The query
    norms get them divided by the square root of the head size: Gemma 4 scales no attention score, so with unit
    query norms a random model's attention is so sharp that rounding a weight flips which key a query attends to,
    and the logits would measure that chaos rather than the file."""
    generator = torch.Generator().manual_seed(seed)
    family = FAMILIES["gemma4"]
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if tensor.dim() == 1 and not family.is_tower_weight(name):
                varied = 1 + 0.25 * torch.randn(tensor.shape, generator=generator)
                if name.endswith("q_norm.weight"):
                    varied /= len(tensor) ** 0.5
                tensors[name] = varied.to(tensor.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Gemma 4 text model with the real structure (sliding and full layers with their own head sizes, the
    last two layers sharing the keys and values of the two before, per-layer embeddings, soft-cap 30), in bf16."""
    path = build_tiny_gemma(tmp_path_factory.mktemp("gemma4"), "gemma4", dtype=torch.bfloat16)
    return _vary_the_vectors(path)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The checkpoint exported once per quantisation, a few rows at a time, as a real embedding is."""
    directory = tmp_path_factory.mktemp("gguf4")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "_CHUNK_ELEMENTS", 1000)
        return {q: export_gguf(checkpoint, directory / f"g4.{q}.gguf", quantization=q) for q in WRITTEN_HERE}


@pytest.fixture(scope="module")
def k_quant_exported(checkpoint, tmp_path_factory):
    """The checkpoint exported at each k-quant, by llama.cpp's quantizer."""
    pytest.importorskip("llama_cpp", reason=LLAMA_REASON)
    directory = tmp_path_factory.mktemp("gguf4-k")
    return {q: export_gguf(checkpoint, directory / f"g4.{q}.gguf", quantization=q) for q in K_QUANTS}


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A whole tiny Gemma 4 (vision and audio towers) in google/gemma-4-E2B-it's layout, in fp32."""
    return _vary_the_vectors(build_hub_checkpoint(tmp_path_factory.mktemp("gemma4-hub"), "gemma4-multimodal"))


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_the_file_holds_what_llama_cpp_reads(checkpoint, exported):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    fields = _fields(exported["q8_0"].path)
    assert fields["general.architecture"] == "gemma4"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {  # the structure llama.cpp's Gemma 4 reads from the file, as the tiny config has it
        "block_count": 4,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.sliding_window": 64,
        "attention.sliding_window_pattern": [True, False, True, False],
        "attention.shared_kv_layers": 2,
        "embedding_length_per_layer_input": 64,
        "attention.key_length": 64,  # the full layers' heads (global_head_dim)
        "attention.value_length": 64,
        "attention.key_length_swa": 32,  # the sliding layers'
        "attention.value_length_swa": 32,
        "rope.dimension_count": 64,
        "rope.dimension_count_swa": 32,
        "rope.freq_base": 1_000_000.0,
        "rope.freq_base_swa": 10_000.0,
        "final_logit_softcapping": 30.0,
    }
    assert {key: fields[f"gemma4.{key}"] for key in expected} == expected
    assert fields["tokenizer.ggml.model"] == "gemma4" and len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    merges = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]  # llama.cpp's BPE merges by their rank
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<turn|>")
    assert fields["tokenizer.ggml.mask_token_id"] == tokenizer.mask_token_id  # as llama.cpp's converter writes it
    assert fields["tokenizer.ggml.add_bos_token"] is True  # llama.cpp adds <bos> to every Gemma 4 prompt
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    modelfile = exported["q8_0"].modelfile.read_text(encoding="utf-8")  # Gemma 4's turns for Ollama
    assert 'PARAMETER stop "<turn|>"' in modelfile.splitlines() and "<|turn>model\n" in modelfile
    types = fields["tokenizer.ggml.token_type"]
    kind = {token: types[tokenizer.convert_tokens_to_ids(token)] for token in ("<|turn>", "<|channel>", "<0xE2>")}
    assert kind == {"<|turn>": gguf.TokenType.CONTROL, "<|channel>": gguf.TokenType.USER_DEFINED, "<0xE2>": 6}

    tensors = _tensors(exported["q8_0"].path)
    assert len(tensors) == 68  # 4 token-wide ones, rope_freqs, 16 in the two layers with keys, 14 in the two without
    assert {"blk.2.attn_k.weight", "blk.2.attn_v.weight", "blk.3.attn_k_norm.weight"}.isdisjoint(tensors)
    assert tensors["per_layer_token_embd.weight"].shape.tolist() == [4 * 64, len(tokenizer)]
    rope = tensors["rope_freqs.weight"]  # proportional RoPE: 8 of the 32 pairs of a 64-wide head turn
    assert rope.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(rope.data, np.array([1.0] * 8 + [1e30] * 24, dtype=np.float32))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).model
    norm = tensors["blk.1.attn_k_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # Gemma 4's norm multiplies by w, as llama.cpp's
    np.testing.assert_array_equal(norm.data, model.layers[1].self_attn.k_norm.weight.detach().numpy())
    scale = tensors["blk.3.layer_output_scale.weight"]
    np.testing.assert_array_equal(scale.data, model.layers[3].layer_scalar.numpy())
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_a_multimodal_gemma4_exports_its_language_model(multimodal, tmp_path):
    result = export_gguf(multimodal, tmp_path / "text.gguf")
    assert result.quantization == "bf16"  # auto: fp32 weights -> bf16, as llama.cpp's converter does
    names = set(_tensors(result.path))
    assert len(names) == 68 and not any("vision" in name or "audio" in name for name in names)
    assert _fields(result.path)["general.architecture"] == "gemma4"


def test_the_real_gemma4_structures_are_what_llama_cpp_runs():
    """E2B, E4B and 31B as benchmarks/realsize_memory.py builds them from their published configs: llama.cpp reads
    every part of them as transformers runs it (none is refused)."""
    from transformers import Gemma4TextConfig

    from persian_qlora._gguf_gemma4 import problems

    spec = importlib.util.spec_from_file_location("realsize_memory", BENCHMARKS / "realsize_memory.py")
    realsize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(realsize)
    assert {name: problems(Gemma4TextConfig(**text)) for name, text in realsize.GEMMA4_TEXT.items()} == {
        "Gemma 4 E2B": [],
        "Gemma 4 E4B": [],
        "Gemma 4 31B": [],
    }


@pytest.fixture(scope="module")
def other_structure(tmp_path_factory):
    """Gemma 4's other options, at toy size: six layers, the last three sharing keys and values, the KV-shared layers'
    MLP twice as wide (use_double_wide_mlp, as E2B), the full layers' keys doubling as values with their own KV head
    count (attention_k_eq_v, num_global_key_value_heads, as the 31B)."""
    path = build_tiny_gemma(
        tmp_path_factory.mktemp("gemma4-other"),
        "gemma4",
        dtype=torch.bfloat16,
        num_hidden_layers=6,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
        attention_k_eq_v=True,
        num_global_key_value_heads=2,
    )
    return _vary_the_vectors(path)


def test_per_layer_widths_and_head_counts_are_written_per_layer(other_structure, tmp_path):
    result = export_gguf(other_structure, tmp_path / "other.gguf")
    fields = _fields(result.path)
    assert fields["gemma4.feed_forward_length"] == [128] * 3 + [256] * 3
    assert fields["gemma4.attention.head_count_kv"] == [1, 1, 2, 1, 1, 2]
    tensors = _tensors(result.path)
    assert "blk.2.attn_v.weight" not in tensors and "blk.1.attn_v.weight" in tensors  # llama.cpp then uses K
    assert tensors["blk.4.ffn_up.weight"].shape.tolist() == [64, 256]


def test_without_a_soft_cap_the_file_turns_llama_cpps_off(tmp_path):
    """llama.cpp's Gemma 4 caps the logits at 30 unless the file says otherwise (llama-hparams.h): a model without a
    cap gets 0, which turns it off."""
    path = build_tiny_gemma(tmp_path / "uncapped", "gemma4", final_logit_softcapping=None)
    assert _fields(export_gguf(path, tmp_path / "x.gguf").path)["gemma4.final_logit_softcapping"] == 0.0


def test_a_mixture_of_experts_is_refused_with_the_reason(tiny_gemma4_moe_path, tmp_path):
    with pytest.raises(
        PersianQLoRAError, match="mixture-of-experts .* does not fine-tune it .* not checked its experts"
    ):
        export_gguf(tiny_gemma4_moe_path, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


# Config changes under which llama.cpp would run another model, and the part the refusal names.
DIFFERENT_MODELS = {
    "kv sharing": (
        {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]},
        r"KV sharing: the shared sliding_attention layers read layer 1's keys and values, llama.cpp's layer 0's",
    ),
    "activation": ({"hidden_activation": "gelu"}, "activation gelu"),
    "attention biases": ({"attention_bias": True}, "attention biases"),
    "bidirectional": ({"use_bidirectional_attention": "all"}, "bidirectional attention"),
    "rope scaling": (
        {
            "rope_parameters": {
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1e6,
                    "factor": 8.0,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }
        },
        "full_attention RoPE scaled by 8.0",
    ),
}


@pytest.mark.parametrize("change", DIFFERENT_MODELS)
def test_a_model_llama_cpp_would_run_differently_is_refused(change, checkpoint, tmp_path):
    edited = shutil.copytree(checkpoint, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text(encoding="utf-8"))
    edit, reason = DIFFERENT_MODELS[change]
    (edited / "config.json").write_text(json.dumps({**config, **edit}), encoding="utf-8")
    with pytest.raises(PersianQLoRAError, match=f"llama.cpp would run this checkpoint as a different model.*{reason}"):
        export_gguf(edited, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.*"))


# Tokenizer changes under which llama.cpp would split some text differently from transformers, and the reason named.
DIFFERENT_SPLITS = {
    # llama.cpp cuts Gemma 4 text at newlines before merging: a merge across one never happens there.
    "a merge across a newline": ([("\n", "▁")], r"its merge '\n' + '▁' joins a newline"),
    # llama.cpp takes a newline run the vocabulary holds whole; these merges cannot build three newlines from the
    # left-first pair that transformers merges first.
    "a newline run the merges cannot build": (
        [("\n", "\n\n")],
        r"its merges do not build the newline run '\n\n\n', which llama.cpp takes whole",
    ),
}


@pytest.mark.parametrize("change", DIFFERENT_SPLITS)
def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(change, checkpoint, tmp_path):
    edited = shutil.copytree(checkpoint, tmp_path / "edited")
    data = json.loads((edited / "tokenizer.json").read_text(encoding="utf-8"))
    merges, reason = DIFFERENT_SPLITS[change]
    for left, right in merges:
        data["model"]["vocab"][left + right] = len(data["model"]["vocab"])
        data["model"]["merges"].append([left, right])
    (edited / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(PersianQLoRAError, match=re.escape(f"llama.cpp would split some text differently: {reason}")):
        export_gguf(edited, tmp_path / "x.gguf")


@pytest.mark.llama
def test_llama_cpp_splits_persian_text_into_the_tokenizers_ids(checkpoint, exported):
    tokenizer, llm = AutoTokenizer.from_pretrained(checkpoint), _llama(exported["bf16"].path)
    conversation = [{"role": "system", "content": "کوتاه پاسخ بده."}, {"role": "user", "content": PERSIAN_TEXTS[0]}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    for text in [*GEMMA4_PROBES, rendered]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        # llama.cpp adds <bos> to every Gemma 4 prompt (the tiny tokenizer adds none of its own; Gemma 4's does).
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == [tokenizer.bos_token_id, *expected], text


def _logit_error(checkpoint, path):
    """llama.cpp's largest logit error on the file against the checkpoint (transformers, fp32), and the largest
    |logit|, over eight bundled test conversations."""
    conversations = PersianChatDataset.bundled(AutoTokenizer.from_pretrained(checkpoint), split="test").conversations
    return _llama_cpp_logit_error(checkpoint, path, conversations[:8])


@pytest.mark.llama
@pytest.mark.parametrize("quantization", list(LLAMA_LOGIT_SHARE))
def test_llama_cpp_gives_the_checkpoints_logits(quantization, checkpoint, exported, request):
    files = request.getfixturevalue("k_quant_exported") if quantization in K_QUANTS else exported
    largest, error = _logit_error(checkpoint, files[quantization].path)
    assert error <= LLAMA_LOGIT_SHARE[quantization] * largest


@pytest.mark.llama
@pytest.mark.parametrize("model", ["multimodal", "other_structure"])
def test_llama_cpp_runs_the_language_model_as_transformers(model, request, tmp_path):
    """A whole multimodal checkpoint (Gemma4ForConditionalGeneration, towers left out) and the six-layer variant
    (doubled MLP in the KV-shared layers, keys as values), at bf16."""
    directory = request.getfixturevalue(model)
    largest, error = _logit_error(directory, export_gguf(directory, tmp_path / f"{model}.gguf").path)
    assert error <= LLAMA_LOGIT_SHARE["bf16"] * largest


@pytest.mark.llama
def test_llama_cpp_ends_a_greedy_reply_on_the_turn_end_where_transformers_does(checkpoint, tmp_path):
    assert_llama_cpp_ends_the_turn_where_transformers_does(*make_the_turn_end_win(checkpoint, tmp_path))
