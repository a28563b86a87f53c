"""A peft LoRA adapter read as edits of named weights: what the merge must do to each tensor of the base.

Three kinds of edit cover what a LoRA adapter can hold, each applied to a block of rows of the weight in fp32:

- :class:`LowRank`, ``W += scale · B A``: LoRA on a linear (``lora_A``/``lora_B``), and on an embedding
  (``lora_embedding_A``/``lora_embedding_B``, whose update is ``(B A)ᵀ``) written in the same row-major form;
- :class:`NewRows`, ``W[i] = row_i``: peft's trainable tokens (``trainable_token_indices``), whose
  ``trainable_tokens_delta`` holds the new rows themselves, not a difference;
- :class:`Replaced`, ``W = T``: a module trained whole (``modules_to_save``).

Everything else peft can save (DoRA, other tuners, LoRA biases...) is refused by name: merging it as plain LoRA
would silently give another model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persian_qlora._shards import COPY_CHUNK, StoredTensor, read_safetensors_file, read_tensor
from persian_qlora.errors import PersianQLoRAError

_PREFIX = "base_model.model."
# Config fields whose non-default value changes what the adapter computes: (field, its plain-LoRA value, name).
_VARIANTS = (
    ("use_dora", False, "DoRA (use_dora=True)"),
    ("lora_bias", False, "LoRA biases (lora_bias=True)"),
    ("use_qalora", False, "QA-LoRA (use_qalora=True)"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens)"),
    ("layer_replication", None, "layer replication"),
    ("target_parameters", None, "LoRA on parameters (target_parameters)"),
    ("use_bdlora", None, "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", None, "Arrow routing (arrow_config)"),
    ("kasa_config", None, "KaSA (kasa_config)"),
    ("monteclora_config", None, "MonteCLoRA (monteclora_config)"),
    ("megatron_config", None, "Megatron-parallel LoRA (megatron_config)"),
    ("fan_in_fan_out", False, "fan_in_fan_out=True (Conv1D layers, which Gemma has none of)"),
)
# Initialisations that also rewrite the base weights: the adapter only fits the rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LowRank:
    """``W[rows] += scale · b[rows] @ a``, with ``b`` of shape (rows of W, r) and ``a`` of shape (r, columns)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    source: str  # the adapter tensor names, for messages

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])

    def apply(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        return weight.addmm_(self.b[rows], self.a, alpha=self.scale)

    def same_as(self, other: Edit) -> bool:
        return (
            isinstance(other, LowRank)
            and self.scale == other.scale
            and torch.equal(self.a, other.a)
            and torch.equal(self.b, other.b)
        )


@dataclass(frozen=True)
class NewRows:
    """``W[i] = values[k]`` for the k-th index ``i`` of ``indices`` (peft's trainable tokens)."""

    indices: tuple[int, ...]
    values: torch.Tensor
    source: str

    @property
    def columns(self) -> int:
        return self.values.shape[1]

    def apply(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        for k, index in enumerate(self.indices):
            if rows.start <= index < rows.stop:
                weight[index - rows.start] = self.values[k]
        return weight

    def same_as(self, other: Edit) -> bool:
        return isinstance(other, NewRows) and self.indices == other.indices and torch.equal(self.values, other.values)


@dataclass(frozen=True)
class Replaced:
    """``W = T``: a module trained whole; ``T`` is read from the adapter a block of rows at a time."""

    tensor: StoredTensor | torch.Tensor
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def rows(self, rows: slice) -> torch.Tensor:
        if isinstance(self.tensor, torch.Tensor):
            return self.tensor[rows].float()
        return read_tensor(self.tensor, rows).float()

    def apply(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        return weight.copy_(self.rows(rows))

    def same_as(self, other: Edit) -> bool:
        """Equal values, compared a block of rows at a time: the merge's memory grows with its largest block, and
        a whole head in fp32 is 5.4 GB for Gemma 3 4B."""
        if not isinstance(other, Replaced) or self.shape != other.shape:
            return False
        rows = self.shape[0] if self.shape else 1
        step = max(1, COPY_CHUNK // (4 * max(1, math.prod(self.shape[1:]))))  # rows of fp32 per block
        return all(
            torch.equal(self.rows(block), other.rows(block))
            for block in (slice(start, min(rows, start + step)) for start in range(0, rows, step))
        )


Edit = LowRank | NewRows | Replaced


@dataclass
class Adapter:
    """A LoRA adapter directory: its config, and its tensors keyed by the trained model's module names."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, StoredTensor | torch.Tensor]

    @property
    def module_names(self) -> set[str]:
        return {_module_of(key) for key in self.tensors}


def read_adapter(directory: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read ``adapter_config.json`` and the adapter's tensors (safetensors; a pickled ``adapter_model.bin`` only
    with ``allow_pickle=True``), refusing any adapter kind the merge does not fold exactly."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise PersianQLoRAError(
            f"{directory} has no adapter_config.json; pass the directory trainer.save_model() wrote"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    refuse_unsupported(config, directory)
    weights = directory / "adapter_model.safetensors"
    if weights.exists():
        raw: dict[str, StoredTensor | torch.Tensor] = dict(read_safetensors_file(weights))
    elif (directory / "adapter_model.bin").exists():
        if not allow_pickle:
            raise PersianQLoRAError(
                f"{directory} holds only a pickled adapter_model.bin, and loading pickles can run code; convert it "
                "to safetensors, or pass allow_pickle=True if you trust its source"
            )
        raw = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise PersianQLoRAError(f"{directory} has no adapter_model.safetensors")
    tensors = {}
    for key, value in raw.items():
        if not key.startswith(_PREFIX):
            raise PersianQLoRAError(f"{directory}: adapter tensor {key} is not under {_PREFIX!r}; is this a peft LoRA?")
        tensors[key.removeprefix(_PREFIX)] = value
    return Adapter(directory, config, tensors)


def refuse_unsupported(config: dict[str, Any], where: Path | str) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise PersianQLoRAError(
            f"{where} is a {peft_type} adapter; merge_to_fp16 folds LoRA adapters only (merge other kinds with peft's "
            "merge_and_unload)"
        )
    for field, plain, name in _VARIANTS:
        if config.get(field, plain) not in (plain, None, False, [], {}):
            raise PersianQLoRAError(
                f"{where} is trained with {name}, which merge_to_fp16 cannot fold as W0 + scale·(B A); retrain "
                "without it, or merge with peft's merge_and_unload in memory"
            )
    if config.get("bias", "none") != "none":
        raise PersianQLoRAError(
            f"{where} trains biases (bias={config['bias']!r}); merge_to_fp16 folds bias='none' only"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise PersianQLoRAError(
            f"{where} was initialised with init_lora_weights={init!r}, which also rewrites the base weights, so the "
            "adapter does not fit the original checkpoint; convert it to plain LoRA first (peft's "
            "path_initial_model_for_weight_conversion when saving)"
        )


def _module_of(key: str) -> str:
    """The module an adapter tensor belongs to (``...q_proj.lora_A.weight`` → ``...q_proj``)."""
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".token_adapter.", ".base_layer."):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def _matches(module: str, names: list[str] | None) -> bool:
    """peft's rule for ``modules_to_save`` and dict ``trainable_token_indices``: a full name or a dotted suffix."""
    return any(module == name or module.endswith(f".{name}") for name in names or ())


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling for one module: alpha/r, or alpha/√r with rsLoRA; ``rank_pattern``/``alpha_pattern`` keys are
    regexes matched against the module name, as peft matches them."""
    from peft.utils.other import get_pattern_key

    r = config["r"]
    if config.get("rank_pattern"):
        r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), module), r)
    alpha = config["lora_alpha"]
    if config.get("alpha_pattern"):
        alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"].keys(), module), alpha)
    if r != rank:
        raise PersianQLoRAError(f"adapter module {module}: adapter_config.json gives rank {r}, its tensors have {rank}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _load(value: StoredTensor | torch.Tensor) -> torch.Tensor:
    return (value if isinstance(value, torch.Tensor) else read_tensor(value)).float()


def adapter_edits(
    adapter: Adapter, text_name: Callable[[str], str | None], input_embedding: str, output_embedding: str
) -> tuple[dict[str, Edit], dict[str, tuple[int, ...]]]:
    """The adapter's edits keyed by the text model's weight names (``model.layers.0.self_attn.q_proj.weight``).

    ``text_name`` maps a module name of the trained model to the text model's (None: outside the language model).
    ``input_embedding`` and ``output_embedding`` are the text model's embedding and LM head modules: a list of
    ``trainable_token_indices`` applies to the first, and with ``ensure_weight_tying`` peft saves both whole when
    either is in ``modules_to_save``. Also returns the saved copies of base layers (the ``base_layer`` tensors peft
    adds when an embedding is targeted), by weight name with their shapes, to be checked against the checkpoint.
    """
    config = adapter.config
    grouped: dict[str, dict[str, StoredTensor | torch.Tensor]] = {}
    for key, value in adapter.tensors.items():
        module = _module_of(key)
        grouped.setdefault(module, {})[key.removeprefix(module + ".")] = value

    edits: dict[str, Edit] = {}
    base_copies: dict[str, tuple[int, ...]] = {}
    for module, parts in grouped.items():
        target = text_name(module)
        if target is None:
            raise PersianQLoRAError(
                f"{adapter.directory}: adapter module {module} is outside the language model (a vision or audio "
                "tower); merge_to_fp16 merges adapters of the language model only"
            )
        tied = config.get("ensure_weight_tying") and target in (input_embedding, output_embedding)
        for kind, edit in _module_edits(config, module, parts, target, input_embedding, tied, adapter.directory):
            if kind == "base_layer":
                base_copies[f"{target}.weight"] = tuple(edit.shape)
                continue
            name = f"{target}.{kind}"
            if name in edits:
                raise PersianQLoRAError(
                    f"{adapter.directory}: {name} is changed by two parts of the adapter ({edits[name].source} and "
                    f"{edit.source}); merge_to_fp16 folds one change per weight"
                )
            edits[name] = edit
    return edits, base_copies


def _module_edits(config, module, parts, target, input_embedding, tied, where):
    """(tensor kind, edit) pairs for one module of the adapter: kind is ``"weight"``/``"bias"``, or ``"base_layer"``
    for a saved copy of the base weight."""
    keys = set(parts)
    if {"lora_A.weight", "lora_B.weight"} <= keys:
        a, b = _load(parts["lora_A.weight"]), _load(parts["lora_B.weight"])
        scale = _scale(config, module, a.shape[0])
        yield "weight", LowRank(a, b, scale, f"{module}.lora_A/B")
        keys -= {"lora_A.weight", "lora_B.weight"}
    if {"lora_embedding_A", "lora_embedding_B"} <= keys:
        # peft's embedding update is (B A)ᵀ * scale, with A (r, vocab) and B (dim, r): as rows, Aᵀ (vocab, r) @ Bᵀ.
        a, b = _load(parts["lora_embedding_A"]), _load(parts["lora_embedding_B"])
        scale = _scale(config, module, a.shape[0])
        yield "weight", LowRank(b.T.contiguous(), a.T.contiguous(), scale, f"{module}.lora_embedding_A/B")
        keys -= {"lora_embedding_A", "lora_embedding_B"}
    if "token_adapter.trainable_tokens_delta" in keys:
        indices = _token_indices(config, module, target, input_embedding, where)
        rows = _load(parts["token_adapter.trainable_tokens_delta"])
        yield "weight", NewRows(indices, rows, f"{module}.trainable_tokens")
        keys.discard("token_adapter.trainable_tokens_delta")
    if "base_layer.weight" in keys:
        yield "base_layer", parts["base_layer.weight"]
        keys.discard("base_layer.weight")
    whole = {k for k in keys if "." not in k}
    if whole and (_matches(module, config.get("modules_to_save")) or tied):
        for kind in sorted(whole):
            yield kind, Replaced(parts[kind], f"{module}.{kind} (modules_to_save)")
        keys -= whole
    if keys:
        raise PersianQLoRAError(
            f"{where}: adapter tensors {sorted(f'{module}.{k}' for k in keys)} are of a kind merge_to_fp16 does not "
            "know (it folds lora_A/B, lora_embedding_A/B, trainable tokens and modules_to_save)"
        )


def _token_indices(config, module, target, input_embedding, where) -> tuple[int, ...]:
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        found = [v for k, v in indices.items() if _matches(module, [k])]
        if len(indices) != 1 or not found:
            raise PersianQLoRAError(
                f"{where}: trainable_token_indices {indices} names other layers than the input embedding; "
                "merge_to_fp16 folds trainable tokens of the input embedding only"
            )
        indices = found[0]
    if target != input_embedding or not indices:
        raise PersianQLoRAError(
            f"{where}: trainable tokens on {module}; merge_to_fp16 folds trainable tokens of the input embedding only"
        )
    return tuple(int(i) for i in indices)
