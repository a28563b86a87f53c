"""What a GGUF export writes, per llama.cpp architecture: one :class:`Architecture` entry each (its keys, what
llama.cpp would run differently, how its tensors are named, generated and stored, its vocabulary), and the plan of
tensors shared by all of them. Writing the planned tensors, block by block, is :mod:`persian_qlora.export`'s.

Everything here reads the checkpoint's safetensors index and config only; no model is built, no weight is read
until the file is written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from persian_qlora._merge_plan import meta_model, text_name
from persian_qlora._shards import StoredTensor
from persian_qlora.errors import MissingExtraError, PersianQLoRAError
from persian_qlora.families import GemmaFamily

if TYPE_CHECKING:
    import gguf

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_ADDED_TOKEN_SCORE = -1000.0  # what convert_hf_to_gguf.py gives control and user-defined pieces


def import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise MissingExtraError("GGUF export", "gguf", "gguf") from err
    return gguf


@dataclass(frozen=True)
class Generated:
    """A tensor the file needs that the checkpoint does not hold as such, made a block of rows at a time when it is
    written. ``why`` says what it is, for errors and for the architecture's reader."""

    shape: tuple[int, ...]
    rows: Callable[[slice], torch.Tensor]
    why: str


Source = StoredTensor | Generated


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    source: Source
    shape: tuple[int, ...]  # the source's, with the embedding and head cut to the tokenizer's rows
    type: gguf.GGMLQuantizationType
    offset: float = 0.0  # added to every weight before it is stored (Gemma 3's norms: 1 + w)

    def row_blocks(self, elements: int) -> Iterator[slice]:
        """The kept rows, a block of at most ``elements`` weights (at least one row) at a time."""
        rows, width = self.shape[0], math.prod(self.shape[1:])
        step = max(1, elements // max(1, width))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))


def nbytes(planned: PlannedTensor) -> int:
    gguf = import_gguf()
    return math.prod(gguf.quant_shape_to_byte_shape(planned.shape, planned.type))


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as llama.cpp reads it: ``model`` is ``tokenizer.ggml.model`` (``"llama"``: SentencePiece pieces
    and scores; ``"gemma4"``: BPE with ``merges``), ``pre`` its pre-tokenizer key where it reads one. ``adds_bos``
    is written as ``add_bos_token`` where llama.cpp fixes it; None writes what the tokenizer does. ``special``: which of
    the tokenizer's special ids are written (``bos`` writes ``tokenizer.ggml.bos_token_id``...)."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    model: str = "llama"
    pre: str | None = "default"
    merges: list[str] = field(default_factory=list)
    adds_bos: bool | None = None
    # the tokenizer's ids written, as the converter's SpecialVocab writes them (mask too: tokenizer.ggml.mask_token_id)
    special: tuple[str, ...] = ("bos", "eos", "unk", "pad", "mask")


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture as the export writes it.

    ``problems(config)``: what llama.cpp fixes or reads differently from this text config, each naming the part
    (empty when llama.cpp runs it as transformers does). ``write_keys(writer, config)``: the architecture's keys.
    ``sources(tensors, config, vocabulary_size)``: the language model's tensors (text name -> source, in the
    model's order) as the file holds them: where the file's tensors are not the checkpoint's one to one (stacked,
    generated, padded), this says how. ``norm_offset`` is added to every RMSNorm weight. ``kept_f32``: gguf
    MODEL_TENSOR names written in F32 whatever the quantisation (as llama.cpp's converter and quantizer do).
    """

    gguf_arch: str  # the gguf.MODEL_ARCH member, e.g. "GEMMA3"
    problems: Callable[[Any], list[str]]
    write_keys: Callable[[Any, Any], None]
    vocabulary: Callable[[Any], Vocabulary]
    norm_offset: float = 0.0
    sources: Callable[[dict[str, Source], Any, int], dict[str, Source]] = lambda tensors, config, size: tensors
    kept_f32: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        gguf = import_gguf()
        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[self.gguf_arch]]


def plan_tensors(
    architecture: Architecture,
    stored: dict[str, StoredTensor],
    family: GemmaFamily,
    config,
    tied: bool,
    vocabulary_size: int,
    weight_type,
) -> list[PlannedTensor]:
    """Every tensor of the language model under its GGUF name, in the order the model holds them (the order an
    in-memory export wrote, so the file is the same), read from the checkpoint without building the model."""
    gguf = import_gguf()
    arch = gguf.MODEL_ARCH[architecture.gguf_arch]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    by_text = {text_name(family, name): tensor for name, tensor in stored.items()}
    by_text.pop(None, None)  # the towers
    text = meta_model(family.text(), config)
    order = [f"model.{name}" for name in text.get_decoder().state_dict()]
    if "lm_head.weight" in by_text and not tied:  # else llama.cpp reuses token_embd as the output
        order.append("lm_head.weight")
    missing = [name for name in order if name not in by_text]
    if missing:
        raise PersianQLoRAError(f"the checkpoint has no {missing[:3]}; is this a whole {family.model_type} checkpoint?")
    sources = architecture.sources({name: by_text[name] for name in order}, config, vocabulary_size)
    kept_f32 = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kept]].removeprefix("blk.{bid}.") for kept in architecture.kept_f32}
    plan = []
    for hf_name, source in sources.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PersianQLoRAError(
                f"no GGUF name for the {family.model_type} tensor {hf_name} in llama.cpp's {arch.name}"
            )
        shape = source.shape
        if name in ("token_embd.weight", "output.weight", "per_layer_token_embd.weight"):  # a row per token
            if shape[0] < vocabulary_size:
                raise PersianQLoRAError(f"{hf_name} has {shape[0]} rows for {vocabulary_size} tokens")
            shape = (vocabulary_size, *shape[1:])  # rows past the tokenizer are never used; llama.cpp wants none
        f32 = len(shape) == 1 or re.sub(r"^blk\.\d+\.|\.weight$", "", name) in kept_f32
        tensor_type = gguf.GGMLQuantizationType.F32 if f32 else weight_type
        if tensor_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            if name == "token_embd.weight" and tensor_type == gguf.GGMLQuantizationType.Q4_0 and tied:
                # Also the output matrix: llama.cpp's quantizer keeps it at 6 bits (Q6_K), which gguf cannot write;
                # Q8_0 is the nearest type it can.
                tensor_type = gguf.GGMLQuantizationType.Q8_0
            if shape[-1] % 32:
                tensor_type = gguf.GGMLQuantizationType.F16  # blocks of 32 weights a row; convert_hf_to_gguf too
        offset = architecture.norm_offset if name.endswith("norm.weight") else 0.0
        plan.append(PlannedTensor(name, source, tuple(shape), tensor_type, offset))
    return plan


def check_merges_follow_the_pieces(bpe: dict[str, Any], added: set[str]) -> None:
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


def sentencepiece_vocabulary(tokenizer) -> Vocabulary:
    """Pieces, scores and types as convert_hf_to_gguf.py writes them for Gemma's SentencePiece model.

    Scores follow SentencePiece's BPE: a normal piece scores minus its rank among the normal pieces (its merge
    priority), bytes 0, control and user-defined pieces -1000. User-defined pieces spell spaces as spaces.
    """
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if bpe.get("type") != "BPE":
        raise PersianQLoRAError(f"the tokenizer is a {bpe.get('type')} model; Gemma's is BPE (SentencePiece-style)")
    added = tokenizer.added_tokens_decoder
    check_merges_follow_the_pieces(bpe, {token.content for token in added.values()})
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
    return Vocabulary(tokens, scores, types)
