"""Model building: a 4-bit NF4 (QLoRA) or 16-bit (LoRA) Gemma base with LoRA on the language layers only.

Both builders share one path and differ only in the quantisation config, so a QLoRA-vs-LoRA comparison differs
in quantisation alone.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persian_qlora.errors import PersianQLoRAError

__all__ = [
    "LoraSettings",
    "build_lora_model",
    "build_qlora_model",
    "default_bnb_config",
    "language_model_targets",
    "load_adapter",
    "resolve_dtype",
]

logger = logging.getLogger("persian_qlora")

# Gemma 3n's AltUp linears are clamped in place during training and break when 4-bit, and the LM head is tied
# to the embedding: none of them is quantised.
FULL_PRECISION_MODULES = ("lm_head", "correction_coefs", "prediction_coefs", "modality_router")


@dataclass
class LoraSettings:
    """LoRA hyperparameters; the defaults are the reference recipe."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    bias: str = "none"
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    extra: dict[str, Any] = field(default_factory=dict)  # any other peft.LoraConfig field

    def to_peft(self, model: nn.Module):
        """A ``peft.LoraConfig`` targeting these module names inside the language model only."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            bias=self.bias,
            target_modules=language_model_targets(model, self.target_modules),
            task_type="CAUSAL_LM",
            **self.extra,
        )


def resolve_dtype(requested: torch.dtype | str | None = None) -> torch.dtype:
    """The compute dtype: bf16 on a GPU that supports it, else fp32 (CPU included). fp16 is refused.

    Gemma was trained in bf16 and overflows in fp16 (inf/NaN activations on T4-class GPUs), so fp16 compute is
    never a safe choice for it.
    """
    if isinstance(requested, str):
        requested = getattr(torch, requested.removeprefix("torch."), None) if requested != "auto" else None
        if requested is not None and not isinstance(requested, torch.dtype):
            raise ValueError(f"unknown dtype {requested!r}")
    if requested == torch.float16:
        raise PersianQLoRAError(
            "fp16 compute is refused for Gemma: its activations overflow fp16 (inf/NaN, as seen on T4 GPUs). "
            "Use bf16 on a GPU that supports it, or fp32"
        )
    if requested is not None:
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_bnb_config(compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype | str | None = None):
    """NF4 with double quantisation, as in the QLoRA paper; AltUp linears and the LM head stay unquantised.

    ``quant_storage`` is the dtype the packed 4-bit weights are stored in (default uint8). FSDP-QLoRA needs it
    equal to the dtype of the other weights (bf16), so that FSDP can flatten all parameters together.
    """
    from transformers import BitsAndBytesConfig

    if isinstance(quant_storage, str):
        quant_storage = getattr(torch, quant_storage.removeprefix("torch."))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(compute_dtype),
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
        llm_int8_skip_modules=list(FULL_PRECISION_MODULES),
    )


def language_model_targets(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """Full names of the linears called ``names`` inside the language model, and nowhere else.

    Multimodal Gemma has ``q_proj``/``k_proj``... in its vision and audio towers too; matching by suffix (peft's
    default) would put adapters there. The language model is found with ``get_decoder()``.
    """
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    wanted = set(names)
    targets = [
        f"{prefix}.{name}" if prefix else name
        for name, module in decoder.named_modules()
        if name.rsplit(".", 1)[-1] in wanted and isinstance(module, nn.Linear)
    ]
    if not targets:
        raise PersianQLoRAError(f"no linear layer named any of {sorted(wanted)} in the language model")
    return targets


def load_adapter(model: nn.Module, adapter: str | Path, *, allow_pickle: bool = False):
    """``PeftModel.from_pretrained``, refusing a pickled ``adapter_model.bin`` unless ``allow_pickle=True``.

    peft falls back to the pickle silently when no safetensors file is there; unpickling runs code from the file.
    """
    from peft import PeftModel

    path = Path(adapter)
    pickled_only = (path / "adapter_model.bin").exists() and not (path / "adapter_model.safetensors").exists()
    if pickled_only and not allow_pickle:
        raise PersianQLoRAError(
            f"{path} holds only a pickled adapter_model.bin, and loading pickles can run code; convert it to "
            "safetensors, or pass allow_pickle=True if you trust its source"
        )
    return PeftModel.from_pretrained(model, adapter)


def _prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """Freeze the base and enable gradient checkpointing, *without* upcasting anything.

    ``peft.prepare_model_for_kbit_training`` casts every non-quantised parameter to fp32: for Gemma 3n E4B that
    is the 262k-row embedding and the per-layer embeddings, several GB (see docs/training.md). Frozen weights need
    no fp32 copy; the trainable LoRA weights are created in fp32 by peft anyway.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def _disable_cpu_weight_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs on the first no-grad forward.

    After that repacking, gradients skip the 4-bit layers and dequantising gives garbage, with only a warning, so
    training after an evaluation (or a merge after generation) would silently break.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _build(
    model_id_or_path: str,
    *,
    gguf_file: str | None,
    quantization_config,
    dtype: torch.dtype,
    lora: LoraSettings | Any | None,
    gradient_checkpointing: bool,
    **load_kwargs: Any,
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if gguf_file is not None:
        from persian_qlora.bases import gguf_base

        model_id_or_path = str(gguf_base(model_id_or_path, gguf_file))
    load_kwargs.setdefault("use_safetensors", True)  # never unpickle weights unless the caller opts in
    model = AutoModelForCausalLM.from_pretrained(
        model_id_or_path, dtype=dtype, quantization_config=quantization_config, **load_kwargs
    )
    if quantization_config is not None:
        _disable_cpu_weight_repacking(model)
    _prepare_for_training(model, gradient_checkpointing)
    lora = lora if lora is not None else LoraSettings()
    if isinstance(lora, LoraConfig):
        peft_config = copy.deepcopy(lora)
        if isinstance(peft_config.target_modules, (list, set, tuple)):  # short names: keep them off the towers
            peft_config.target_modules = language_model_targets(model, sorted(peft_config.target_modules))
    else:
        peft_config = lora.to_peft(model)
    model = get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s: %d trainable LoRA parameters of %d (%.3f%%)", model_id_or_path, trainable, total, 100 * trainable / total
    )
    return model


def build_qlora_model(
    model_id_or_path: str,
    *,
    gguf_file: str | None = None,
    lora: LoraSettings | Any | None = None,
    bnb_config: Any | None = None,
    dtype: torch.dtype | str | None = None,
    gradient_checkpointing: bool = True,
    **load_kwargs: Any,
):
    """Load a Gemma model in 4-bit NF4 with double quantisation and attach LoRA to its language layers.

    ``lora`` is a :class:`LoraSettings` (default: r=8, alpha=16, dropout 0, the 7 attention/MLP projections) or a
    ``peft.LoraConfig`` (a list of target names in it is also confined to the language model). ``bnb_config``
    replaces :func:`default_bnb_config`. ``dtype`` is the compute dtype (default: bf16 on a capable GPU, fp32
    otherwise) and the dtype of the unquantised weights. Other keyword arguments go to ``from_pretrained``
    (``device_map``, ``attn_implementation``, ``revision``...); weights load from safetensors only unless
    ``use_safetensors=None`` is passed.
    ``gguf_file`` names a GGUF checkpoint as in transformers (a path, or a file in ``model_id_or_path``). It is
    converted once into a cached bf16 checkpoint (:func:`~persian_qlora.bases.gguf_base`) and the base loads from
    that: transformers cannot quantise a GGUF-loaded model with bitsandbytes, and QLoRA and LoRA must start from
    the same weights. Load the tokenizer from ``gguf_base(model_id_or_path, gguf_file)``.
    Returns the ``peft.PeftModel``.
    """
    dtype = resolve_dtype(dtype)
    return _build(
        model_id_or_path,
        gguf_file=gguf_file,
        quantization_config=bnb_config if bnb_config is not None else default_bnb_config(dtype),
        dtype=dtype,
        lora=lora,
        gradient_checkpointing=gradient_checkpointing,
        **load_kwargs,
    )


def build_lora_model(
    model_id_or_path: str,
    *,
    gguf_file: str | None = None,
    lora: LoraSettings | Any | None = None,
    dtype: torch.dtype | str | None = None,
    gradient_checkpointing: bool = True,
    **load_kwargs: Any,
):
    """The same as :func:`build_qlora_model` on an unquantised 16-bit base (bf16; fp32 on CPU)."""
    return _build(
        model_id_or_path,
        gguf_file=gguf_file,
        quantization_config=None,
        dtype=resolve_dtype(dtype),
        lora=lora,
        gradient_checkpointing=gradient_checkpointing,
        **load_kwargs,
    )
