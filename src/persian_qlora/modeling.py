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

from persian_qlora._deprecation import renamed_arguments
from persian_qlora.errors import PersianQLoRAError
from persian_qlora.families import turn_format_of
from persian_qlora.loading import BaseLoading, default_bnb_config, hub_kwargs, load_base, resolve_dtype
from persian_qlora.tokens import indistinct_tokens

__all__ = [
    "BaseLoading",
    "LoraSettings",
    "build_lora_model",
    "build_qlora_model",
    "default_bnb_config",
    "language_model_targets",
    "load_adapter",
    "resolve_dtype",
]

logger = logging.getLogger("persian_qlora")


@dataclass
class LoraSettings:
    """LoRA hyperparameters; the defaults are the reference recipe.

    ``train_turn_end`` (beyond the recipe) also trains the turn-end embedding row (``<end_of_turn>``, Gemma 4's
    ``<turn|>``), tied to the LM head, when the base's row is not distinct from others (a pretrained, not
    instruction-tuned, Gemma): otherwise the frozen head cannot prefer it over its near-copies and the model never
    ends its turn (see :mod:`persian_qlora.tokens`). It adds peft's ``trainable_token_indices`` for that one row, saved
    with the adapter and merged with it; an instruction-tuned base's row is distinct and nothing is added.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    bias: str = "none"
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_turn_end: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # any other peft.LoraConfig field

    def to_peft(self, model: nn.Module, trainable_tokens: list[int] | None = None):
        """A ``peft.LoraConfig`` targeting these module names inside the language model only, and training the
        embedding rows of ``trainable_tokens`` (unless ``extra`` sets ``trainable_token_indices`` itself)."""
        from peft import LoraConfig

        extra = dict(self.extra)
        if trainable_tokens and "trainable_token_indices" not in extra:
            extra["trainable_token_indices"] = {"embed_tokens": list(trainable_tokens)}
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            bias=self.bias,
            target_modules=language_model_targets(model, self.target_modules),
            task_type="CAUSAL_LM",
            **extra,
        )

    def turn_end_rows_to_train(self, model: nn.Module, base: str, **hub: Any) -> list[int]:
        """``[id of the turn end]`` when ``train_turn_end`` is on and the base's row is not distinct, else ``[]``.
        ``hub``: where the base's tokenizer is (``token``, ``revision``, ``cache_dir``...), as for its weights."""
        if not self.train_turn_end:
            return []
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base, **hub)
        end_of_turn = turn_format_of(tokenizer).end_of_turn
        turn_end = tokenizer.convert_tokens_to_ids(end_of_turn)
        if turn_end is None or turn_end == tokenizer.unk_token_id:
            return []
        found = indistinct_tokens(model.get_input_embeddings().weight, [turn_end])
        if found:
            logger.info(
                "%s: the %s row is not distinct from other rows; training it with the adapter", base, end_of_turn
            )
        return found


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
    model: str | Path,
    *,
    quantization_config,
    dtype: torch.dtype,
    lora: LoraSettings | Any | None,
    gradient_checkpointing: bool,
    **load_kwargs: Any,
):
    from peft import LoraConfig, get_peft_model

    model, loading = load_base(model, dtype=dtype, quantization_config=quantization_config, **load_kwargs)
    if quantization_config is not None:
        _disable_cpu_weight_repacking(model)
    _prepare_for_training(model, gradient_checkpointing)
    lora = lora if lora is not None else LoraSettings()
    if isinstance(lora, LoraConfig):
        peft_config = copy.deepcopy(lora)
        if isinstance(peft_config.target_modules, (list, set, tuple)):  # short names: keep them off the towers
            peft_config.target_modules = language_model_targets(model, sorted(peft_config.target_modules))
    else:
        peft_config = lora.to_peft(model, lora.turn_end_rows_to_train(model, loading.base, **hub_kwargs(load_kwargs)))
    model = get_peft_model(model, peft_config)
    model.base_loading = loading  # saved beside the adapter by the trainer (base_loading.json)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s: %d trainable LoRA parameters of %d (%.3f%%)", loading.base, trainable, total, 100 * trainable / total
    )
    return model


@renamed_arguments(model_id_or_path="model")
def build_qlora_model(
    model: str | Path,
    *,
    gguf_file: str | None = None,
    lora: LoraSettings | Any | None = None,
    bnb_config: Any | None = None,
    dtype: torch.dtype | str | None = None,
    text_only: bool = True,
    gradient_checkpointing: bool = True,
    **load_kwargs: Any,
):
    """Load the Gemma checkpoint ``model`` (hub id or directory) in 4-bit NF4 with double quantisation and attach
    LoRA to its language layers.

    ``lora`` is a :class:`LoraSettings` (default: r=8, alpha=16, dropout 0, the 7 attention/MLP projections) or a
    ``peft.LoraConfig`` (a list of target names in it is also confined to the language model). ``bnb_config``
    replaces :func:`default_bnb_config`. ``dtype`` is the compute dtype (default: bf16 on a GPU with native bf16,
    fp32 otherwise, see :func:`resolve_dtype`) and the dtype of the unquantised weights.

    A multimodal checkpoint (Gemma 3n E4B, Gemma 3 4B) loads its language model alone unless ``text_only=False``,
    which loads the towers too: frozen, unquantised and without LoRA. The model lands on the GPU when there is one;
    Gemma 3n's per-layer embeddings then stay in host memory (``per_layer_embeddings_on_host``, see
    :func:`~persian_qlora.loading.load_base`, which takes the other keyword arguments: ``device_map``,
    ``attn_implementation``, ``revision``...; weights load from safetensors only unless ``use_safetensors=None``).
    ``gguf_file`` names a GGUF checkpoint as in transformers (a path, or a file in ``model``). It is
    converted once into a cached bf16 checkpoint (:func:`~persian_qlora.bases.gguf_base`) and the base loads from
    that: transformers cannot quantise a GGUF-loaded model with bitsandbytes, and QLoRA and LoRA must start from
    the same weights. Load the tokenizer from ``gguf_base(model, gguf_file)``.
    Returns the ``peft.PeftModel``; its ``base_loading`` records how the base was loaded.
    """
    dtype = resolve_dtype(dtype)
    return _build(
        model,
        gguf_file=gguf_file,
        quantization_config=bnb_config if bnb_config is not None else default_bnb_config(dtype),
        dtype=dtype,
        text_only=text_only,
        lora=lora,
        gradient_checkpointing=gradient_checkpointing,
        **load_kwargs,
    )


@renamed_arguments(model_id_or_path="model")
def build_lora_model(
    model: str | Path,
    *,
    gguf_file: str | None = None,
    lora: LoraSettings | Any | None = None,
    dtype: torch.dtype | str | None = None,
    text_only: bool = True,
    gradient_checkpointing: bool = True,
    **load_kwargs: Any,
):
    """The same as :func:`build_qlora_model` on an unquantised 16-bit base (bf16; fp32 on CPU and T4)."""
    return _build(
        model,
        gguf_file=gguf_file,
        quantization_config=None,
        dtype=resolve_dtype(dtype),
        text_only=text_only,
        lora=lora,
        gradient_checkpointing=gradient_checkpointing,
        **load_kwargs,
    )
