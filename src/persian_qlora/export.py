"""`export_gguf`: a merged Gemma 3 as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.

The file is written with the ``gguf`` package (the llama.cpp project's own Python writer): its ``GEMMA3``
architecture, its tensor-name map, its metadata heuristics and its numpy Q8_0 and Q4_0 quantisation. The export
streams: no model is built; each tensor is read from the checkpoint's safetensors a block of rows at a time, through
the merge's shard reader, encoded and appended to the file, so memory grows with a block, not with the model.
What goes in follows
llama.cpp's ``convert_hf_to_gguf.py`` for Gemma 3, so that llama.cpp (and transformers' GGUF reader) read it as they
read an official conversion:

- the architecture keys llama.cpp reads, the RMSNorm weights stored as ``1 + w`` (Gemma's norm multiplies by
  ``1 + w``, llama.cpp's by ``w``), the norms in F32, no ``lm_head`` when it is tied to the embedding;
- the tokenizer as SentencePiece pieces (``tokenizer.ggml.model = "llama"``) with scores and token types, the
  special ids, ``<end_of_turn>`` as the end-of-turn token, and the Gemma chat template.

llama.cpp fixes some of Gemma 3's shape instead of reading it (every 6th layer global, local RoPE base 10000, query
scale 1/sqrt(head_dim)); a checkpoint that differs is refused rather than written into a file that would run a
different model. Gemma 3n is refused: transformers cannot read a ``gemma3n`` GGUF back, so the export could not be
checked (see docs/export.md).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from persian_qlora._deprecation import renamed_arguments
from persian_qlora._files import atomic_write_text, require_free_space, staged_file
from persian_qlora._merge_plan import meta_model, text_name
from persian_qlora._shards import INDEX_FILE, SINGLE_FILE, StoredTensor, read_checkpoint, read_tensor
from persian_qlora.chat_template import gemma3_chat_template
from persian_qlora.errors import MissingExtraError, PersianQLoRAError
from persian_qlora.families import FAMILIES, GEMMA3_TURNS, GemmaFamily, TurnFormat
from persian_qlora.generation import REFERENCE_SAMPLING

if TYPE_CHECKING:
    import gguf

__all__ = ["GGUFExport", "Quantization", "export_adapter_gguf", "export_gguf", "render_modelfile"]

logger = logging.getLogger("persian_qlora")

Quantization = Literal["auto", "bf16", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
# quantization -> (the GGML type of the weights, llama.cpp's file type), written here by gguf
_QUANTIZATIONS = {
    "bf16": ("BF16", "MOSTLY_BF16"),
    "f16": ("F16", "MOSTLY_F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# quantization -> llama_cpp's name of the file type. gguf can read k-quants but not write them: llama.cpp's own
# quantizer writes them from the 16-bit file, choosing each tensor's type by its rules (the "_m" mixes keep some
# tensors at more bits, and a row length that is not a multiple of 256 falls back to a 32-block type).
_LLAMA_CPP_QUANTIZATIONS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}

# What llama.cpp's Gemma 3 (llama-model.cpp, LLM_ARCH_GEMMA3) assumes instead of reading it from the file.
_LLAMA_CPP_GLOBAL_EVERY = 6  # set_swa_pattern(6): layers 5, 11, 17, ... attend globally, the others locally
_LLAMA_CPP_LOCAL_ROPE_BASE = 10_000.0  # rope_freq_base_train_swa
_LLAMA_CPP_27B_LAYERS = 62  # the one size whose query scale is 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim)
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_ADDED_TOKEN_SCORE = -1000.0  # what convert_hf_to_gguf.py gives control and user-defined pieces
_CHUNK_ELEMENTS = 2**22  # read and encode this many weights at a time (16 MiB in fp32), whatever the tensor's size
_GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR, CONT)


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    modelfile: Path
    quantization: str  # the one written: "bf16", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m" or "q6_k"
    tensors: int
    parameters: int


@dataclass(frozen=True)
class _Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    source: StoredTensor
    shape: tuple[int, ...]  # the source's, with the embedding and head cut to the tokenizer's rows
    type: gguf.GGMLQuantizationType
    norm: bool  # stored as 1 + w, in F32

    def row_blocks(self) -> Iterator[slice]:
        """The kept rows, a block of at most ``_CHUNK_ELEMENTS`` weights (at least one row) at a time."""
        rows, width = self.shape[0], math.prod(self.shape[1:])
        step = max(1, _CHUNK_ELEMENTS // max(1, width))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))


class _StreamedTensor:
    """The encoded bytes of one planned tensor, produced block by block when GGUFWriter writes them: the writer asks
    an array only for ``nbytes`` and ``tofile``, so it never holds the whole tensor."""

    def __init__(self, planned: _PlannedTensor) -> None:
        self.planned = planned
        self.nbytes = _nbytes(planned)

    def tofile(self, handle) -> None:
        written = 0
        for rows in self.planned.row_blocks():
            encoded = _encode(self.planned, read_tensor(self.planned.source, rows))
            encoded.tofile(handle)
            written += encoded.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"GGUF export: {self.planned.name} encoded to {written} bytes, planned {self.nbytes}")


def _import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise MissingExtraError("GGUF export", "gguf", "gguf") from err
    return gguf


def _import_llama_cpp(quantization: str):
    try:
        import llama_cpp
    except ImportError as err:
        raise MissingExtraError(
            f"GGUF export at {quantization} (llama.cpp's quantizer)", "llama", "llama-cpp-python"
        ) from err
    return llama_cpp


@contextmanager
def _llama_cpp_log(errors: list[str]) -> Iterator[None]:
    """llama.cpp's C log (a few lines per tensor while quantizing) into persian_qlora's debug log instead of the
    terminal, its error lines also into ``errors``; the callback set before (the binding's own) is put back."""
    import llama_cpp

    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))

    @llama_cpp.llama_log_callback
    def record(level: int, text: bytes, user_data) -> None:
        line = text.decode("utf-8", errors="replace")
        logger.debug("llama.cpp: %s", line.rstrip("\n"))
        if level == _GGML_LOG_LEVEL_ERROR:
            errors.append(line.strip())

    llama_cpp.llama_log_set(record, ctypes.c_void_p())
    try:
        yield
    finally:
        llama_cpp.llama_log_set(previous, previous_data)


def _quantize_with_llama_cpp(source: Path, target: Path, quantization: str) -> None:
    """Quantize the 16-bit GGUF file ``source`` into ``target`` with llama.cpp's own quantizer, as its
    llama-quantize tool does (default parameters: the type mix and fallbacks are llama.cpp's)."""
    llama_cpp = _import_llama_cpp(quantization)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_CPP_QUANTIZATIONS[quantization])
    errors: list[str] = []
    with _llama_cpp_log(errors):
        failed = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(target), ctypes.byref(params))
    if failed:
        raise PersianQLoRAError(
            f"llama.cpp's quantizer could not write {quantization}: {' '.join(errors) or f'error {failed}'}"
        )


def _check_is_gemma3_checkpoint(merged_dir: Path) -> None:
    """Refuse, with the reason, a directory that is not a full Gemma 3 checkpoint in safetensors."""
    if not merged_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {merged_dir}")
    has_weights = (merged_dir / SINGLE_FILE).is_file() or (merged_dir / INDEX_FILE).is_file()
    if (merged_dir / "adapter_config.json").is_file() and not has_weights:
        raise PersianQLoRAError(
            f"{merged_dir} is a LoRA adapter, not a model: merge it into its base first "
            f"(persian-qlora merge --adapter {merged_dir} --output MERGED_DIR, then export MERGED_DIR), or export "
            f"in one step: persian-qlora export-gguf --adapter {merged_dir} --base BASE --output FILE"
        )
    config_file = merged_dir / "config.json"
    if not config_file.is_file() or not has_weights:
        pickled = any(merged_dir.glob("pytorch_model*.bin"))
        raise PersianQLoRAError(
            f"{merged_dir} is not a checkpoint directory (config.json and safetensors weights)"
            + ("; its weights are pickled: re-save it with transformers' save_pretrained" if pickled else "")
        )
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise PersianQLoRAError(
            f"{merged_dir} is a {model_type!r} checkpoint; GGUF export writes Gemma 3 (model_type gemma3_text or "
            "gemma3) only"
        )
    if family.gguf_architecture is None:
        raise PersianQLoRAError(
            f"{merged_dir} is a {model_type} checkpoint; GGUF export covers Gemma 3 only: not Gemma 3n, because "
            "transformers cannot read a gemma3n GGUF back to check the file, and not yet Gemma 4, whose export has "
            "not been checked in llama.cpp (see docs/export.md). Use the merged checkpoint with transformers, or "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )


def _check_llama_cpp_runs_it_as_is(config) -> None:
    """Refuse a Gemma 3 whose shape llama.cpp would silently replace with its fixed Gemma 3 one."""
    problems = []
    expected_layers = [
        "full_attention" if (i + 1) % _LLAMA_CPP_GLOBAL_EVERY == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    if list(config.layer_types) != expected_layers:
        problems.append(f"layer_types {list(config.layer_types)} (llama.cpp makes every 6th layer global)")
    rope = config.rope_parameters
    local = rope.get("sliding_attention", {})
    if local.get("rope_theta") != _LLAMA_CPP_LOCAL_ROPE_BASE or local.get("rope_type", "default") != "default":
        problems.append(f"local RoPE {local} (llama.cpp uses base 10000, unscaled)")
    if rope.get("full_attention", {}).get("rope_type", "default") not in ("default", "linear"):
        problems.append(f"global RoPE {rope['full_attention']} (llama.cpp reads default or linear scaling)")
    per_head = config.hidden_size // config.num_attention_heads
    scalar = per_head if config.num_hidden_layers == _LLAMA_CPP_27B_LAYERS else config.head_dim
    if config.query_pre_attn_scalar != scalar:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp uses {scalar})")
    if config.attn_logit_softcapping is not None:
        problems.append("attention soft-capping (Gemma 3 has none; llama.cpp ignores it)")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention (an embedding model, not a chat model)")
    if config.hidden_activation != "gelu_pytorch_tanh":
        problems.append(f"activation {config.hidden_activation} (llama.cpp uses tanh-approximated GELU)")
    if problems:
        raise PersianQLoRAError(
            "llama.cpp would run this checkpoint as a different model, so it is not exported: " + "; ".join(problems)
        )


def _check_merges_follow_the_pieces(bpe: dict[str, Any], added: set[str]) -> None:
    """Refuse a tokenizer that llama.cpp would split differently from transformers.

    The GGUF carries pieces and scores, not merges: llama.cpp merges any two adjacent pieces that form a piece,
    best score first, as SentencePiece does. A BPE tokenizer behaves the same only when its merges are exactly
    those pairs, ranked in piece order; Gemma's own tokenizer (converted from SentencePiece) is, but one trained
    with ``tokenizers``' BpeTrainer keeps only the merges it learned.
    """
    vocab = bpe["vocab"]
    pieces = {piece for piece in vocab if piece not in added}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    merges = [(left, right) for left, right in merges if left + right in pieces]
    implied = {
        (piece[:cut], piece[cut:])
        for piece in pieces
        for cut in range(1, len(piece))
        if piece[:cut] in pieces and piece[cut:] in pieces
    }
    missing = implied - set(merges)
    merged_ids = [vocab[left + right] for left, right in merges]
    out_of_order = next((i for i in range(1, len(merges)) if merged_ids[i] < merged_ids[i - 1]), None)
    if missing or out_of_order is not None:
        reason = (
            f"{len(missing)} pairs that form a piece have no merge, e.g. {sorted(missing)[:3]}"
            if missing
            else f"merge {out_of_order} {merges[out_of_order]} makes a piece with a lower id than the one before"
        )
        raise PersianQLoRAError(
            "the tokenizer cannot be written as the SentencePiece vocabulary llama.cpp expects for Gemma: llama.cpp "
            f"would split some text differently ({reason}). Gemma's own tokenizer passes this check; a BPE "
            "tokenizer trained with the tokenizers library does not"
        )


def _sentencepiece_vocabulary(tokenizer) -> _Vocabulary:
    """Pieces, scores and types as convert_hf_to_gguf.py writes them for Gemma's SentencePiece model.

    Scores follow SentencePiece's BPE: a normal piece scores minus its rank among the normal pieces (its merge
    priority), bytes 0, control and user-defined pieces -1000. User-defined pieces spell spaces as spaces.
    """
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if bpe.get("type") != "BPE":
        raise PersianQLoRAError(f"the tokenizer is a {bpe.get('type')} model; Gemma's is BPE (SentencePiece-style)")
    added = tokenizer.added_tokens_decoder
    _check_merges_follow_the_pieces(bpe, {token.content for token in added.values()})
    tokens, scores, types = [], [], []
    normal_rank = 0
    for index, piece in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))):
        if index in added:
            token_type = 3 if added[index].special else 4  # CONTROL, USER_DEFINED
            score = _ADDED_TOKEN_SCORE
            piece = piece if added[index].special else piece.replace("▁", " ")
        elif bpe.get("byte_fallback") and _BYTE_PIECE.fullmatch(piece):
            token_type, score = 6, 0.0  # BYTE
        elif piece == tokenizer.unk_token:
            token_type, score = 2, 0.0  # UNKNOWN
        else:
            token_type, score = 1, -float(normal_rank)  # NORMAL
            normal_rank += 1
        tokens.append(piece)
        scores.append(score)
        types.append(token_type)
    return _Vocabulary(tokens, scores, types)


def _plan_tensors(
    stored: dict[str, StoredTensor], family: GemmaFamily, config, tied: bool, vocabulary_size: int, weight_type
) -> list[_PlannedTensor]:
    """Every tensor of the language model under its GGUF name, in the order the model holds them (the order an
    in-memory export wrote, so the file is the same), read from the checkpoint without building the model."""
    gguf = _import_gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    by_text = {text_name(family, name): tensor for name, tensor in stored.items()}
    by_text.pop(None, None)  # the towers
    text = meta_model(family.text(), config)
    order = [f"model.{name}" for name in text.get_decoder().state_dict()]
    if "lm_head.weight" in by_text and not tied:  # else llama.cpp reuses token_embd as the output
        order.append("lm_head.weight")
    missing = [name for name in order if name not in by_text]
    if missing:
        raise PersianQLoRAError(f"the checkpoint has no {missing[:3]}; is this a whole Gemma 3 checkpoint?")
    plan = []
    for hf_name in order:
        source = by_text[hf_name]
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PersianQLoRAError(f"no GGUF name for the Gemma 3 tensor {hf_name}; is this a Gemma 3 checkpoint?")
        shape = source.shape
        if name in ("token_embd.weight", "output.weight"):
            if shape[0] < vocabulary_size:
                raise PersianQLoRAError(f"{hf_name} has {shape[0]} rows for {vocabulary_size} tokens")
            shape = (vocabulary_size, *shape[1:])  # rows past the tokenizer are never used; llama.cpp wants none
        norm = len(shape) == 1
        tensor_type = gguf.GGMLQuantizationType.F32 if norm else weight_type
        if tensor_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            if name == "token_embd.weight" and tensor_type == gguf.GGMLQuantizationType.Q4_0 and tied:
                # Also the output matrix: llama.cpp's quantizer keeps it at 6 bits (Q6_K), which gguf cannot write;
                # Q8_0 is the nearest type it can.
                tensor_type = gguf.GGMLQuantizationType.Q8_0
            if shape[-1] % 32:
                tensor_type = gguf.GGMLQuantizationType.F16  # blocks of 32 weights a row; convert_hf_to_gguf too
        plan.append(_PlannedTensor(name, source, tuple(shape), tensor_type, norm))
    return plan


def _encode(planned: _PlannedTensor, block: torch.Tensor):
    """A block of the tensor's rows in its GGUF type; norms become 1 + w, as llama.cpp multiplies by the stored
    weight. Refuses a block that is not finite."""
    gguf = _import_gguf()
    kind = gguf.GGMLQuantizationType
    if block.numel():
        low, high = (float(v) for v in torch.aminmax(block.float()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise PersianQLoRAError(
                f"non-finite weights in {planned.source.name} ({planned.source.file}); the checkpoint is broken"
            )
    if planned.norm:
        return (block.float() + 1.0).numpy()
    if planned.type == kind.F16:
        return block.to(torch.float16).numpy()
    if planned.type == kind.BF16:
        return block.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(block.float().reshape(-1, planned.shape[-1]).numpy(), planned.type)


def _nbytes(planned: _PlannedTensor) -> int:
    gguf = _import_gguf()
    return math.prod(gguf.quant_shape_to_byte_shape(planned.shape, planned.type))


def _write_architecture(writer, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    global_rope = config.rope_parameters["full_attention"]
    writer.add_rope_freq_base(global_rope["rope_theta"])
    writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])  # as the converter does
    if global_rope.get("rope_type") == "linear":
        gguf = _import_gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(global_rope["factor"])
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _write_tokenizer(writer, tokenizer, vocabulary: _Vocabulary) -> None:
    from persian_qlora.masking import GemmaTurnMarkers

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    for kind in ("bos", "eos", "unk", "pad", "mask"):  # the special tokens convert_hf_to_gguf.py writes
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_eot_token_id(GemmaTurnMarkers.from_tokenizer(tokenizer).end_of_turn)
    plain, marked = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    added = len(marked) - len(plain)  # what the tokenizer adds around a text on its own
    writer.add_add_bos_token(added > 0 and marked[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(added > 0 and marked[-1] == tokenizer.eos_token_id)
    writer.add_add_sep_token(False)  # Gemma never separates a pair of texts
    writer.add_add_space_prefix(False)  # Gemma 3 adds no leading space (convert_hf_to_gguf.py sets it so too)
    writer.add_chat_template(tokenizer.chat_template or gemma3_chat_template())


def _write_general(writer, merged_dir: Path, parameters: int, file_type: int) -> None:
    """Name, size, licence and tags by gguf's own heuristics (model card, config, directory), as llama.cpp does,
    and the recipe's sampling, which llama.cpp takes as its defaults."""
    gguf = _import_gguf()
    metadata = gguf.Metadata.load(None, merged_dir, None, parameters)
    metadata.name = metadata.name or merged_dir.name
    # A base model the card names by a local path (a merge of a local base) is no reference for anyone else, and
    # gguf would turn it into a hub URL that does not exist.
    hub = "https://huggingface.co/"
    metadata.base_models = [
        base
        for base in metadata.base_models or []
        if not Path(base.get("repo_url", "").removeprefix(hub)).expanduser().exists()
    ] or None
    metadata.size_label = metadata.size_label or gguf.size_label(parameters, 0, 0, 0)
    metadata.sampling_temp = REFERENCE_SAMPLING["temperature"]
    metadata.sampling_top_p = REFERENCE_SAMPLING["top_p"]
    metadata.sampling_top_k = REFERENCE_SAMPLING["top_k"]
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)


def render_modelfile(gguf_name: str, turns: TurnFormat = GEMMA3_TURNS) -> str:
    """An Ollama Modelfile for the GGUF file ``gguf_name`` beside it: the turn format's template and turn end as
    the stop token, the recipe's sampling."""
    if turns.ollama_template is None:
        raise PersianQLoRAError(f"persian-qlora has no Ollama template for {turns.name}'s turn format")
    return "\n".join(
        [
            f"FROM ./{gguf_name}",
            f'TEMPLATE """{turns.ollama_template}"""',
            f'PARAMETER stop "{turns.end_of_turn}"',
            f"PARAMETER temperature {REFERENCE_SAMPLING['temperature']}",
            f"PARAMETER top_p {REFERENCE_SAMPLING['top_p']}",
            f"PARAMETER top_k {REFERENCE_SAMPLING['top_k']}",
            "",
        ]
    )


def _write_file(writer, plan: list[_PlannedTensor], path: Path) -> None:
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for planned in plan:  # a block of one tensor in memory at a time
            writer.write_tensor_data(_StreamedTensor(planned))
    finally:
        writer.close()


@renamed_arguments(merged_dir="model")
def export_gguf(
    model: str | Path,
    output_file: str | Path,
    *,
    quantization: Quantization = "auto",
    overwrite: bool = False,
) -> GGUFExport:
    """Write the Gemma 3 checkpoint ``model`` as the GGUF file ``output_file``, and an Ollama Modelfile beside it.

    ``model`` is the directory of a :func:`~persian_qlora.merge_to_fp16` output or of any Gemma 3 checkpoint in
    safetensors (for a multimodal one, its language model). ``quantization``: ``"bf16"``, ``"f16"``, ``"q8_0"``
    (8-bit, about half the size), ``"q4_0"`` (4-bit, about a quarter; the tied embedding, which is also the output
    matrix, stays Q8_0), or ``"auto"``, the checkpoint's own 16-bit type. Norms stay F32. The k-quants
    ``"q4_k_m"``, ``"q5_k_m"`` and ``"q6_k"`` are written by llama.cpp's own quantizer from a temporary 16-bit file
    (the checkpoint's own type) beside ``output_file``, which is removed afterwards; they need the ``llama`` extra.
    Streams tensor by tensor: memory grows with a block of rows, not with the model. The Modelfile is
    ``output_file`` with the suffix ``.Modelfile``. Both are written atomically after a free-space check; an
    existing file is refused unless ``overwrite=True``. Needs the ``gguf`` extra.
    """
    gguf = _import_gguf()
    from transformers import AutoConfig, AutoTokenizer

    if quantization != "auto" and quantization not in (*_QUANTIZATIONS, *_LLAMA_CPP_QUANTIZATIONS):
        choices = ", ".join(["auto", *_QUANTIZATIONS, *_LLAMA_CPP_QUANTIZATIONS])
        raise ValueError(f"quantization must be one of {choices}; got {quantization!r}")
    k_quant = quantization if quantization in _LLAMA_CPP_QUANTIZATIONS else None
    if k_quant:
        _import_llama_cpp(k_quant)  # before any work
    merged_dir, output_file = Path(model), Path(output_file)
    _check_is_gemma3_checkpoint(merged_dir)
    whole_config = AutoConfig.from_pretrained(merged_dir)
    config = whole_config.get_text_config()
    _check_llama_cpp_runs_it_as_is(config)
    modelfile = output_file.with_suffix(".Modelfile")
    for path in (output_file, modelfile):
        if path.exists() and not overwrite:
            raise PersianQLoRAError(f"{path} already exists; choose another output file or pass overwrite=True")

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    vocabulary = _sentencepiece_vocabulary(tokenizer)
    stored = read_checkpoint(merged_dir)
    family = FAMILIES[whole_config.model_type]
    tied = bool(getattr(whole_config, "tie_word_embeddings", True) and config.tie_word_embeddings)
    if quantization == "auto" or k_quant:  # the checkpoint's own 16-bit type, as llama.cpp's --outtype auto
        embedding = next(t for name, t in stored.items() if text_name(family, name) == "model.embed_tokens.weight")
        quantization = "f16" if embedding.dtype == torch.float16 else "bf16"  # fp32 -> bf16, as llama.cpp's too
    weight_type, file_type = _QUANTIZATIONS[quantization]
    plan = _plan_tensors(stored, family, config, tied, len(vocabulary.tokens), gguf.GGMLQuantizationType[weight_type])

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    parameters = sum(math.prod(p.shape) for p in plan)
    _write_general(writer, merged_dir, parameters, gguf.LlamaFileType[file_type])
    _write_architecture(writer, config)
    _write_tokenizer(writer, tokenizer, vocabulary)
    for planned in plan:  # the shape as given: the raw type says how it is stored
        writer.add_tensor_info(planned.name, planned.shape, np.dtype(np.float32), _nbytes(planned), planned.type)

    output_file.parent.mkdir(parents=True, exist_ok=True)
    # A k-quant needs the 16-bit file and, beside it, the smaller quantized one.
    needed = sum(_nbytes(p) for p in plan) * (2 if k_quant else 1) + 64 * 2**20
    require_free_space(output_file.parent, needed, "the GGUF file")
    with staged_file(output_file) as temporary:
        if k_quant is None:
            _write_file(writer, plan, temporary)
        else:
            sixteen_bit = temporary.with_name(f"{temporary.stem}.{quantization}.partial")
            try:
                _write_file(writer, plan, sixteen_bit)
                _quantize_with_llama_cpp(sixteen_bit, temporary, k_quant)
            finally:
                sixteen_bit.unlink(missing_ok=True)
            quantization = k_quant
    atomic_write_text(modelfile, render_modelfile(output_file.name))
    logger.info("wrote %s (%s, %d tensors) and %s", output_file, quantization, len(plan), modelfile.name)
    return GGUFExport(output_file, modelfile, quantization, len(plan), parameters)


def export_adapter_gguf(
    adapter: str | Path,
    output_file: str | Path,
    *,
    base: str | Path | None = None,
    quantization: Quantization = "auto",
    overwrite: bool = False,
    **merge_kwargs: Any,
) -> GGUFExport:
    """From a LoRA adapter to a GGUF file and its Ollama Modelfile in one step: merge ``adapter`` into ``base`` (by
    default the adapter's ``base_model_name_or_path``) with :func:`~persian_qlora.merge_to_fp16`, streaming into a
    temporary folder beside ``output_file`` that is removed afterwards, then :func:`export_gguf` it.

    ``merge_kwargs`` go to the merge (``merge_base``, ``gguf_file``, ``strict``...); the merge writes bf16, and
    ``quantization="auto"`` keeps it."""
    from persian_qlora.merging import merge_to_fp16

    adapter, output_file = Path(adapter), Path(output_file)
    if base is None:
        config_file = adapter / "adapter_config.json"
        if not config_file.is_file():
            raise PersianQLoRAError(f"{adapter} has no adapter_config.json; pass the folder trainer.save_model() wrote")
        base = json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]
    for path in (output_file, output_file.with_suffix(".Modelfile")):  # before the merge's minutes, not after
        if path.exists() and not overwrite:
            raise PersianQLoRAError(f"{path} already exists; choose another output file or pass overwrite=True")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_file.name}.merge-", dir=output_file.parent) as work:
        merged = merge_to_fp16(base, adapter, Path(work) / "merged", **merge_kwargs).output_dir
        return export_gguf(merged, output_file, quantization=quantization, overwrite=overwrite)
