"""`export_gguf`: a merged Gemma 3, 3n or 4 as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile
beside it.

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
different model. What is particular to an architecture (its keys, what llama.cpp would run differently, how its
tensors are named and stored, its vocabulary) is one entry per llama.cpp architecture, keyed by the family table's
``gguf_architecture``: ``_gguf_gemma3.GEMMA3``; ``_gguf_gemma3n.GEMMA3N`` (Gemma 3n's language model, towers left
out, checked in llama.cpp itself, as transformers cannot read a ``gemma3n`` GGUF back; llama.cpp fixes E2B/E4B's
structure, and a 3n that differs is refused naming the part); and ``_gguf_gemma4.GEMMA4`` (llama.cpp's ``gemma4``,
which reads more of the model's structure from its keys and a BPE vocabulary with merges). See docs/export.md.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from persian_qlora._deprecation import renamed_arguments
from persian_qlora._files import atomic_write_text, require_free_space, staged_file
from persian_qlora._gguf_gemma3 import GEMMA3
from persian_qlora._gguf_gemma3n import GEMMA3N
from persian_qlora._gguf_gemma4 import GEMMA4
from persian_qlora._gguf_plan import Architecture, PlannedTensor, Vocabulary, import_gguf, nbytes, plan_tensors
from persian_qlora._merge_plan import text_name
from persian_qlora._shards import INDEX_FILE, SINGLE_FILE, StoredTensor, read_checkpoint, read_tensor
from persian_qlora.errors import MissingExtraError, PersianQLoRAError
from persian_qlora.families import FAMILIES, GEMMA3_TURNS, TurnFormat
from persian_qlora.generation import REFERENCE_SAMPLING

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

_CHUNK_ELEMENTS = 2**22  # read and encode this many weights at a time (16 MiB in fp32), whatever the tensor's size
# One entry per llama.cpp architecture, keyed by the family table's gguf_architecture.
_ARCHITECTURES: dict[str, Architecture] = {"gemma3": GEMMA3, "gemma3n": GEMMA3N, "gemma4": GEMMA4}
_GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR, CONT)


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    modelfile: Path
    quantization: str  # the one written: "bf16", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m" or "q6_k"
    tensors: int
    parameters: int


class _StreamedTensor:
    """The encoded bytes of one planned tensor, produced block by block when GGUFWriter writes them: the writer asks
    an array only for ``nbytes`` and ``tofile``, so it never holds the whole tensor."""

    def __init__(self, planned: PlannedTensor) -> None:
        self.planned = planned
        self.nbytes = nbytes(planned)

    def tofile(self, handle) -> None:
        written, source = 0, self.planned.source
        for rows in self.planned.row_blocks(_CHUNK_ELEMENTS):
            block = read_tensor(source, rows) if isinstance(source, StoredTensor) else source.rows(rows)
            encoded = _encode(self.planned, block)
            encoded.tofile(handle)
            written += encoded.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"GGUF export: {self.planned.name} encoded to {written} bytes, planned {self.nbytes}")


def _encode(planned: PlannedTensor, block: torch.Tensor):
    """A block of the tensor's rows in its GGUF type, plus the planned offset (Gemma 3's norms become 1 + w, as
    llama.cpp multiplies by the stored weight). Refuses a block that is not finite."""
    gguf = import_gguf()
    kind = gguf.GGMLQuantizationType
    if block.numel():
        low, high = (float(v) for v in torch.aminmax(block.float()))
        if not (math.isfinite(low) and math.isfinite(high)):
            source = planned.source
            where = f"{source.name} ({source.file})" if isinstance(source, StoredTensor) else planned.name
            raise PersianQLoRAError(f"non-finite weights in {where}; the checkpoint is broken")
    if planned.type == kind.F32:
        block = block.float()
        return (block + planned.offset if planned.offset else block).numpy()
    if planned.type == kind.F16:
        return block.to(torch.float16).numpy()
    if planned.type == kind.BF16:
        return block.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(block.float().reshape(-1, planned.shape[-1]).numpy(), planned.type)


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


def _architecture_of(merged_dir: Path) -> Architecture:
    """The architecture to write a checkpoint directory as; refuses, with the reason, one that is not a full
    checkpoint in safetensors of a family the export writes."""
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
            f"{merged_dir} is a {model_type!r} checkpoint; GGUF export writes Gemma 3, Gemma 3n and Gemma 4 "
            "(model_type gemma3_text, gemma3, gemma3n_text, gemma3n, gemma4_text or gemma4) only"
        )
    if family.gguf_architecture is None:
        raise PersianQLoRAError(
            f"{merged_dir} is a {model_type} checkpoint, which GGUF export does not write (see docs/export.md). Use "
            "the merged checkpoint with transformers, or convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return _ARCHITECTURES[family.gguf_architecture]


def _write_tokenizer(writer, tokenizer, vocabulary: Vocabulary, turns: TurnFormat) -> None:
    from persian_qlora.masking import GemmaTurnMarkers

    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    if vocabulary.merges:
        writer.add_token_merges(vocabulary.merges)
    for kind in vocabulary.special:
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_eot_token_id(GemmaTurnMarkers.from_tokenizer(tokenizer).end_of_turn)
    plain, marked = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    added = len(marked) - len(plain)  # what the tokenizer adds around a text on its own
    adds_bos = added > 0 and marked[0] == tokenizer.bos_token_id
    writer.add_add_bos_token(adds_bos if vocabulary.adds_bos is None else vocabulary.adds_bos)
    writer.add_add_eos_token(added > 0 and marked[-1] == tokenizer.eos_token_id)
    writer.add_add_sep_token(False)  # Gemma never separates a pair of texts
    writer.add_add_space_prefix(False)  # Gemma adds no leading space (convert_hf_to_gguf.py sets it so too)
    writer.add_chat_template(tokenizer.chat_template or turns.chat_template())


def _write_general(writer, merged_dir: Path, parameters: int, file_type: int) -> None:
    """Name, size, licence and tags by gguf's own heuristics (model card, config, directory), as llama.cpp does,
    and the recipe's sampling, which llama.cpp takes as its defaults."""
    gguf = import_gguf()
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


def _write_file(writer, plan: list[PlannedTensor], path: Path) -> None:
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
    """Write the Gemma 3 or 4 checkpoint ``model`` as the GGUF file ``output_file``, and an Ollama Modelfile beside
    it.

    ``model`` is the directory of a :func:`~persian_qlora.merge_to_fp16` output or of any Gemma 3 or Gemma 4
    checkpoint in safetensors (for a multimodal one, its language model; the towers are left out). A mixture-of-experts
    Gemma 4 (26B-A4B) is refused. ``quantization``: ``"bf16"``, ``"f16"``, ``"q8_0"``
    (8-bit, about half the size), ``"q4_0"`` (4-bit, about a quarter; the tied embedding, which is also the output
    matrix, stays Q8_0), or ``"auto"``, the checkpoint's own 16-bit type. Norms stay F32. The k-quants
    ``"q4_k_m"``, ``"q5_k_m"`` and ``"q6_k"`` are written by llama.cpp's own quantizer from a temporary 16-bit file
    (the checkpoint's own type) beside ``output_file``, which is removed afterwards; they need the ``llama`` extra.
    Streams tensor by tensor: memory grows with a block of rows, not with the model. The Modelfile is
    ``output_file`` with the suffix ``.Modelfile``. Both are written atomically after a free-space check; an
    existing file is refused unless ``overwrite=True``. Needs the ``gguf`` extra.
    """
    gguf = import_gguf()
    from transformers import AutoConfig, AutoTokenizer

    if quantization != "auto" and quantization not in (*_QUANTIZATIONS, *_LLAMA_CPP_QUANTIZATIONS):
        choices = ", ".join(["auto", *_QUANTIZATIONS, *_LLAMA_CPP_QUANTIZATIONS])
        raise ValueError(f"quantization must be one of {choices}; got {quantization!r}")
    k_quant = quantization if quantization in _LLAMA_CPP_QUANTIZATIONS else None
    if k_quant:
        _import_llama_cpp(k_quant)  # before any work
    merged_dir, output_file = Path(model), Path(output_file)
    architecture = _architecture_of(merged_dir)
    whole_config = AutoConfig.from_pretrained(merged_dir)
    config = whole_config.get_text_config()
    family = FAMILIES[whole_config.model_type]
    experts = family.expert_parameters(whole_config)
    if experts:
        raise PersianQLoRAError(
            f"{merged_dir} is a mixture-of-experts {family.model_type} (the 26B-A4B's structure, {experts:,} expert "
            "parameters), which GGUF export does not write: persian-qlora does not fine-tune it (bitsandbytes does "
            "not quantise its 3-D expert weights and LoRA cannot adapt them) and has not checked its experts in "
            "llama.cpp, so a file could run as a different model. Convert the original checkpoint with llama.cpp's "
            "convert_hf_to_gguf.py, or fine-tune and export a dense Gemma 4 (E2B, E4B, 31B)"
        )
    problems = architecture.problems(config)
    if problems:
        raise PersianQLoRAError(
            "llama.cpp would run this checkpoint as a different model, so it is not exported: " + "; ".join(problems)
        )
    modelfile = output_file.with_suffix(".Modelfile")
    for path in (output_file, modelfile):
        if path.exists() and not overwrite:
            raise PersianQLoRAError(f"{path} already exists; choose another output file or pass overwrite=True")

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    vocabulary = architecture.vocabulary(tokenizer)
    stored = read_checkpoint(merged_dir)
    tied = bool(getattr(whole_config, "tie_word_embeddings", True) and config.tie_word_embeddings)
    if quantization == "auto" or k_quant:  # the checkpoint's own 16-bit type, as llama.cpp's --outtype auto
        embedding = next(t for name, t in stored.items() if text_name(family, name) == "model.embed_tokens.weight")
        quantization = "f16" if embedding.dtype == torch.float16 else "bf16"  # fp32 -> bf16, as llama.cpp's too
    weight_type, file_type = _QUANTIZATIONS[quantization]
    weights = gguf.GGMLQuantizationType[weight_type]
    plan = plan_tensors(architecture, stored, family, config, tied, len(vocabulary.tokens), weights)

    writer = gguf.GGUFWriter(None, architecture.name)
    parameters = sum(math.prod(p.shape) for p in plan)
    _write_general(writer, merged_dir, parameters, gguf.LlamaFileType[file_type])
    architecture.write_keys(writer, config)
    _write_tokenizer(writer, tokenizer, vocabulary, family.turns)
    for planned in plan:  # the shape as given: the raw type says how it is stored
        writer.add_tensor_info(planned.name, planned.shape, np.dtype(np.float32), nbytes(planned), planned.type)

    output_file.parent.mkdir(parents=True, exist_ok=True)
    # A k-quant needs the 16-bit file and, beside it, the smaller quantized one.
    needed = sum(nbytes(p) for p in plan) * (2 if k_quant else 1) + 64 * 2**20
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
    atomic_write_text(modelfile, render_modelfile(output_file.name, family.turns))
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
