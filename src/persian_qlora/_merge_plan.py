"""What the streaming merge does to each tensor of the base: the plan (which tensor gets which adapter edit, which
is re-made as NF4, whether the LM head stays tied), writing it, and checking what was written.

Names meet in the text model's namespace (``model.layers.0.self_attn.q_proj.weight``): a multimodal checkpoint's
tensor names and a whole model's module names are both renamed there by the family table's ``text_weight_names``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persian_qlora._adapter_edits import Adapter, Edit, NewRows, adapter_edits
from persian_qlora._shards import ShardWriter, StoredTensor, copy_bytes, read_checkpoint, read_tensor
from persian_qlora.errors import MissingExtraError, PersianQLoRAError
from persian_qlora.families import GemmaFamily
from persian_qlora.loading import BaseLoading

logger = logging.getLogger("persian_qlora")


@dataclass(frozen=True)
class NF4Settings:
    """The 4-bit round trip a QLoRA run's base went through, as recorded beside its adapter."""

    quant_type: str
    blocksize: int
    double_quant: bool
    double_quant_blocksize: int | None
    quant_storage: torch.dtype
    load_dtype: torch.dtype
    device: str
    skip_modules: tuple[str, ...]

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """``dequantize_4bit(quantize_4bit(W))`` exactly as ``Params4bit`` quantised the loaded weight, in fp32."""
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        packed, state = quantize_4bit(
            weight.to(device=self.device, dtype=self.load_dtype).contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        nested = state.state2.blocksize if state.nested else None
        if nested != self.double_quant_blocksize:
            raise PersianQLoRAError(
                f"this bitsandbytes quantises the absmax statistics in blocks of {nested}, but training recorded "
                f"{self.double_quant_blocksize}; merge with the bitsandbytes version training used (base_loading.json)"
            )
        return dequantize_4bit(packed, state).to(device="cpu", dtype=torch.float32)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: where its W0 comes from, and what is done to it."""

    name: str
    source: StoredTensor
    dtype: torch.dtype
    edit: Edit | None = None
    nf4: NF4Settings | None = None  # set when W0 is the NF4 round trip of the stored weight

    @property
    def changed(self) -> bool:
        return self.edit is not None or self.nf4 is not None

    def blocks(self) -> list[slice]:
        if self.nf4 is not None or not self.source.shape:  # NF4 statistics span the whole tensor
            return [slice(0, self.source.shape[0] if self.source.shape else 1)]
        return list(self.source.row_chunks())

    def w0(self, rows: slice) -> torch.Tensor:
        """Rows of W0 in fp32: the stored weight, or its NF4 round trip."""
        stored = read_tensor(self.source, rows if self.source.shape else None)
        return self.nf4.round_trip(stored) if self.nf4 is not None else stored.float()

    def merged(self, w0: torch.Tensor, rows: slice) -> torch.Tensor:
        """The rows of W0 with the adapter's edit applied, in place, in fp32."""
        return self.edit.apply(w0, rows) if self.edit is not None else w0


def text_name(family: GemmaFamily, name: str) -> str | None:
    """A weight or module name of ``family``'s model (or checkpoint) as the text model names it; None for towers.
    The family table's renames serve both: a multimodal checkpoint's names and a whole model's module names."""
    if not family.multimodal:
        return name
    for pattern, replacement in family.text_weight_names:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    return name if name.split(".", 1)[0] == "lm_head" else None


def trained_text_only(family: GemmaFamily, record: BaseLoading | None, lora: Adapter) -> bool:
    """Whether the adapter was trained on the language model alone (its module names are the text model's)."""
    if record is not None:
        if record.model_type != family.model_type:
            raise PersianQLoRAError(
                f"the adapter in {lora.directory} was trained on a {record.model_type} checkpoint ({record.base}), "
                f"but this base is {family.model_type}; merge it into the base it was trained on"
            )
        return record.text_only
    whole = family.multimodal and any(
        family.is_tower_weight(m) or text_name(family, m) not in (None, m) for m in lora.module_names
    )
    logger.warning(
        "%s has no base_loading.json (saved by an older persian-qlora, or by peft directly): assuming it was trained "
        "on the %s, as its module names say",
        lora.directory,
        "whole model" if whole else "language model alone",
    )
    return not whole


def nf4_settings(
    merge_base: str, quant_dtype: torch.dtype | None, record: BaseLoading | None, family: GemmaFamily, where: Path
) -> NF4Settings | None:
    """The recorded NF4 settings for ``merge_base="nf4"``, or a clear refusal when they are missing or contradicted."""
    if merge_base == "original":
        if quant_dtype is not None:
            raise ValueError("quant_dtype applies to merge_base='nf4' only")
        return None
    if record is None:
        if quant_dtype is None:
            raise PersianQLoRAError(
                f"{where} has no base_loading.json, so how its base was quantised in training is unknown; merge with "
                "merge_base='original', or pass quant_dtype (the dtype the base was loaded in before quantising: "
                "torch.float32 on CPU and T4, torch.bfloat16 on Ampere or newer) to assume persian-qlora's default "
                "NF4 settings"
            )
        logger.warning(
            "%s: no base_loading.json; assuming NF4, blocks of 64, double quantisation, from %s", where, quant_dtype
        )
        return NF4Settings("nf4", 64, True, 256, torch.uint8, quant_dtype, "cpu", family.never_quantised)
    quantization = record.quantization
    if quantization is None:
        raise PersianQLoRAError(
            f"the adapter in {where} was trained on a 16-bit base (LoRA, no quantisation), so there is no NF4 base "
            "to merge into; use merge_base='original'"
        )
    if quantization.get("method") != "bitsandbytes" or quantization.get("quant_type") not in ("nf4", "fp4"):
        raise PersianQLoRAError(
            f"{where}: training recorded quantisation {quantization}, which merge_to_fp16 cannot re-make"
        )
    load_dtype = record.torch_dtype("load_dtype")
    if quant_dtype is not None and quant_dtype != load_dtype:
        raise PersianQLoRAError(
            f"quant_dtype={quant_dtype} contradicts the adapter's record: training quantised its base from "
            f"{load_dtype} ({where / 'base_loading.json'}); leave quant_dtype unset"
        )
    device = "cpu"
    if quantization["quantized_on"] == "cuda":
        if torch.cuda.is_available():
            device = "cuda"
        else:
            logger.warning(
                "%s was quantised on CUDA and is re-quantised here on the CPU: the two kernels can round a few NF4 "
                "blocks differently (see docs/merging.md)",
                where,
            )
    return NF4Settings(
        quant_type=quantization["quant_type"],
        blocksize=quantization["blocksize"],
        double_quant=quantization["double_quant"],
        double_quant_blocksize=quantization.get("double_quant_blocksize"),
        quant_storage=getattr(torch, quantization["quant_storage"]),
        load_dtype=load_dtype,
        device=device,
        skip_modules=tuple(quantization.get("skip_modules") or ()),
    )


class TrainedModel:
    """The model the adapter was trained on, built on the meta device (no memory): its module names, embeddings,
    tie, and which of its linears the 4-bit loader quantises."""

    def __init__(self, family: GemmaFamily, config: Any, text_only: bool) -> None:
        self.family = family
        self.text_only = text_only or not family.multimodal
        self.config = config
        text = meta_model(family.text(), config.get_text_config())
        self.input_embedding = _module_name(text, text.get_input_embeddings())
        self.output_embedding = _module_name(text, text.get_output_embeddings())
        self.tied = text.get_output_embeddings().weight is text.get_input_embeddings().weight
        self._text_model = text

    def text_name(self, module: str) -> str | None:
        """A module name of the trained model, as the text model names it."""
        return module if self.text_only else text_name(self.family, module)

    def quantised_weights(self, skip_modules: tuple[str, ...]) -> set[str]:
        """Text names of the weights the 4-bit loader quantised: transformers' own rule (every ``nn.Linear``, by
        exact type, whose name no skip pattern or ``_keep_in_fp32_modules`` entry matches)."""
        from transformers.quantizers.quantizers_utils import should_convert_module

        model = self._text_model if self.text_only else meta_model(self.family, self.config)
        skip = [*skip_modules, *(getattr(model, "_keep_in_fp32_modules", None) or [])]
        names = set()
        for name, module in model.named_modules():
            if type(module) is nn.Linear and should_convert_module(name, skip):
                text = self.text_name(name)
                if text is not None:
                    names.add(f"{text}.weight")
        return names


def meta_model(family: GemmaFamily, config: Any) -> nn.Module:
    try:
        with torch.device("meta"):
            return family.model_class()(config)
    except ImportError as err:
        if "timm" in str(err).lower():
            raise MissingExtraError(
                f"merging an adapter trained on the whole {family.model_type} model", "multimodal", "timm"
            ) from err
        raise


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def plan_outputs(
    stored: dict[str, StoredTensor], lora: Adapter, trained: TrainedModel, nf4: NF4Settings | None, dtype: torch.dtype
) -> tuple[list[OutputTensor], bool]:
    """Every output tensor in the order of the base's files, with its edit; and whether the LM head stays tied."""
    edits, base_copies = adapter_edits(lora, trained.text_name, trained.input_embedding, trained.output_embedding)
    by_text = {}
    for name in stored:
        text = text_name(trained.family, name)
        if text is not None:
            by_text[text] = name
    embedding, head = f"{trained.input_embedding}.weight", f"{trained.output_embedding}.weight"
    tied_head = True
    extra: list[OutputTensor] = []
    if trained.tied and head not in by_text:
        head_edit = edits.pop(head, None)
        if head_edit is None and isinstance(edits.get(embedding), NewRows):
            head_edit = edits[embedding]  # peft ties trainable tokens of the embedding to the tied head
        embedding_edit = edits.get(embedding)
        tied_head = head_edit is embedding_edit or (
            head_edit is not None and embedding_edit is not None and head_edit.same_as(embedding_edit)
        )
        if not tied_head:  # trained apart: the head becomes a tensor of its own, made from the stored embedding
            source = stored[by_text[embedding]]
            extra.append(OutputTensor(head, source, dtype, head_edit))
            logger.warning(
                "the adapter changes the LM head and the input embedding differently, so they are written untied "
                "(lm_head.weight, tie_word_embeddings=false)"
            )
    if trained.tied:
        base_copies.pop(head, None)  # the tied head's saved base layer is the embedding
    missing = [name for name in [*edits, *base_copies] if name not in by_text]
    if missing:
        raise PersianQLoRAError(
            f"the adapter in {lora.directory} changes weights the checkpoint does not have: {missing[:5]}; it was "
            "trained on another base (see its adapter_config.json and base_loading.json)"
        )
    for name, edit in edits.items():
        _check_fits(getattr(edit, "shape", None), edit, stored[by_text[name]], lora)
    for name, shape in base_copies.items():
        _check_fits(shape, None, stored[by_text[name]], lora)
    for output in extra:
        if output.edit is not None:
            _check_fits(getattr(output.edit, "shape", None), output.edit, output.source, lora)
    quantised = trained.quantised_weights(nf4.skip_modules) if nf4 is not None else set()
    outputs = []
    for name, source in stored.items():
        text = text_name(trained.family, name)
        out_dtype = dtype if source.dtype.is_floating_point else source.dtype
        outputs.append(OutputTensor(name, source, out_dtype, edits.get(text), nf4 if text in quantised else None))
    return outputs + extra, tied_head


def _check_fits(shape: tuple[int, ...] | None, edit: Edit | None, source: StoredTensor, lora: Adapter) -> None:
    """Refuse an adapter tensor whose shape does not fit the checkpoint's (another base, or a resized vocabulary)."""
    if isinstance(edit, NewRows):
        fits = edit.columns == source.shape[1] and max(edit.indices) < source.shape[0]
    else:
        fits = tuple(shape) == tuple(source.shape)
    if not fits:
        what = (
            f"rows {list(edit.indices)} of width {edit.columns}"
            if isinstance(edit, NewRows)
            else f"a {tuple(shape)} tensor"
        )
        raise PersianQLoRAError(
            f"the adapter in {lora.directory} changes {source.name} as {what}, but the checkpoint's tensor is "
            f"{tuple(source.shape)}: it was trained on another base (or a resized vocabulary)"
        )


def write_output(output: OutputTensor, writer: ShardWriter) -> None:
    """Write one output tensor: a byte copy, or block by block its merge (or plain cast) in the output dtype."""
    if not output.changed and output.dtype == output.source.dtype:
        copy_bytes(output.source, writer, output.name)
        return
    limit = torch.finfo(output.dtype).max
    for rows in output.blocks():
        block = output.merged(output.w0(rows), rows)
        # One reduction checks both (NaN and inf propagate into it); torch.isfinite().all() costs six times as much.
        # An empty block has no extremes, and nothing to check.
        low, high = (float(v) for v in torch.aminmax(block)) if block.numel() else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)):
            if output.changed or bool(block.isnan().any()):
                raise PersianQLoRAError(f"{output.name} is not finite in fp32; the adapter or the base is broken")
            # An unchanged tensor may hold ±inf on purpose (Gemma 4's clippable linears: no clipping bound); a cast
            # keeps it exactly. Its finite values must still fit the output dtype.
            finite = block[block.isfinite()]
            low, high = (float(v) for v in torch.aminmax(finite)) if finite.numel() else (0.0, 0.0)
        if max(-low, high) > limit:
            raise PersianQLoRAError(
                f"{output.name}: values overflow {output.dtype} when cast; use dtype=torch.bfloat16 (the default)"
            )
        writer.write(output.name, block.to(output.dtype))


def check_written(outputs: list[OutputTensor], directory: Path) -> tuple[float | None, str | None]:
    """Re-read every tensor written to ``directory`` and compare it bit for bit with what it must be: an unchanged
    tensor with its source after the cast (byte-identical when the dtype is the stored one), a changed one with its
    fp32 merge recomputed from W0 and the adapter, then cast. For each tensor the adapter changed, also measure how
    much of its update the output dtype's rounding lost: ‖(written − W0 in the output dtype) − ΔW‖ / ‖ΔW‖. Returns
    the largest such share and its tensor."""
    written = read_checkpoint(directory)
    worst, worst_name = None, None
    for output in outputs:
        found = written.get(output.name)
        if found is None or found.dtype != output.dtype or found.shape != output.source.shape:
            raise PersianQLoRAError(f"verify: {output.name} was not written as planned in {directory}")
        error = update = 0.0
        for rows in output.blocks():
            got = read_tensor(found, rows if found.shape else None)
            w0 = output.w0(rows)
            exact = output.merged(w0.clone() if output.edit is not None else w0, rows)
            if not torch.equal(got.view(torch.uint8), exact.to(output.dtype).contiguous().view(torch.uint8)):
                raise PersianQLoRAError(f"verify: {output.name} in {directory} is not what was computed for it")
            if output.edit is not None:
                change = exact - w0
                error += float((got.float() - w0.to(output.dtype).float() - change).square().sum())
                update += float(change.square().sum())
        if update > 0 and (worst is None or (error / update) ** 0.5 > worst):
            worst, worst_name = (error / update) ** 0.5, output.name
    if worst is not None and worst > 0.5:
        logger.warning(
            "verify: the output dtype's rounding loses %.0f%% of the update to %s; merge into a wider dtype "
            "(dtype=torch.float32) to keep it",
            100 * worst,
            worst_name,
        )
    return worst, worst_name
