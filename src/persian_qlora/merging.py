"""`merge_to_fp16`: fold a LoRA adapter into its base, W = W0 + (B A)·alpha/r, and save a standalone 16-bit model.

Two choices of W0 (``merge_base``):

- ``"original"``: the 16-bit base weights. The merged model is the original model plus the learned update; with
  a QLoRA adapter it differs from what training saw by the NF4 quantisation error.
- ``"nf4"``: the NF4-dequantized weights that a QLoRA adapter was trained against. The merged model reproduces
  the trained base+adapter (up to fp16 rounding), but every quantised linear carries the NF4 error.

See docs/merging.md for the trade-off. Merging happens in fp32; the result is checked for inf/NaN before and after
the cast, and written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from persian_qlora._files import require_free_space, staged_directory
from persian_qlora.errors import PersianQLoRAError

__all__ = ["MergeResult", "merge_to_fp16", "push_to_hub", "render_model_card"]

logger = logging.getLogger("persian_qlora")

MergeBase = Literal["original", "nf4"]
_MERGE_BASE_WORDS = {"original": "the original 16-bit weights", "nf4": "the NF4-dequantized weights it was trained on"}
_PROBE = [
    {"role": "user", "content": "سلام! لطفاً در یک جمله بگو تخت جمشید کجاست."},
    {"role": "assistant", "content": "تخت جمشید در نزدیکی شیراز، در استان فارس است."},
]


@dataclass
class MergeResult:
    output_dir: Path
    merge_base: MergeBase
    dtype: torch.dtype
    max_abs_logit_diff: float | None  # merged (reloaded from disk) vs base+adapter, when verify=True


def _dequantize_nf4_into(model: nn.Module, base: str, quant_dtype: torch.dtype, load_kwargs: dict[str, Any]) -> int:
    """Replace every weight the 4-bit loader quantises with its NF4 round trip (as QLoRA training saw it).

    The base is loaded in 4-bit with the same settings as :func:`build_qlora_model`, so exactly the same linears
    are quantised (towers included, AltUp and the LM head not); each is dequantized into ``model``.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from persian_qlora.modeling import default_bnb_config

    quantized = AutoModelForCausalLM.from_pretrained(
        base, dtype=quant_dtype, quantization_config=default_bnb_config(torch.float32), **load_kwargs
    )
    targets = dict(model.named_modules())
    count = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            targets[name].weight.data.copy_(weight.to(torch.float32))
            count += 1
    del quantized
    return count


def _probe_logits(model: nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(_PROBE, return_tensors="pt", return_dict=True)["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _check_finite(model: nn.Module, stage: str) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise PersianQLoRAError(
            f"{stage}: non-finite weights in {len(bad)} tensor(s), first {bad[:3]}; the adapter or base is broken "
            "(for fp16 output, try dtype=torch.bfloat16)"
        )


def _check_free_space(model: nn.Module, directory: Path) -> None:
    """Refuse to start writing shards that cannot fit: a full disk mid-save is the worst way to find out."""
    seen: set[int] = set()
    needed = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() not in seen:  # tied weights are stored once
            seen.add(tensor.data_ptr())
            needed += tensor.numel() * tensor.element_size()
    require_free_space(directory, int(needed * 1.05) + 50 * 2**20, "the merged model")  # + headers, tokenizer, card


def render_model_card(
    *,
    base: str,
    adapter_config: dict[str, Any],
    merge_base: MergeBase,
    dtype: torch.dtype,
    datasets: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    license: str | None = None,
) -> str:
    """A hub model card (README.md) with metadata, the LoRA recipe, the merge settings and any known metrics."""
    license = license or ("gemma" if "gemma" in base.lower() else None)
    front = ["---", f"base_model: {base}", "library_name: transformers", "pipeline_tag: text-generation"]
    front += ["language:", "- fa"] + ([f"license: {license}"] if license else [])
    front += ["tags:"] + [f"- {t}" for t in ("persian", "farsi", "gemma", "peft", "lora", "persian-qlora")]
    if datasets:
        front += ["datasets:"] + [f"- {d}" for d in datasets]
    front.append("---")
    targets = adapter_config.get("target_modules") or []
    short_targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
    body = [
        "",
        f"# {base.rstrip('/').rsplit('/', 1)[-1]} fine-tuned on Persian conversations",
        "",
        f"A standalone {str(dtype).removeprefix('torch.')} model: the LoRA adapter merged into `{base}` with "
        "[persian-qlora](https://github.com/persian-qlora/persian-qlora) (transformers + peft, no Unsloth).",
        "",
        "## Training recipe",
        "",
        f"- LoRA r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
        f"dropout={adapter_config.get('lora_dropout')}, targets {', '.join(short_targets)} (language layers only)",
        f"- merge base: `{merge_base}` ({_MERGE_BASE_WORDS[merge_base]}), merged in fp32 as W = W0 + (B A)·alpha/r",
    ]
    if datasets:
        body.append(f"- data: {', '.join(datasets)}")
    if metrics:
        body += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    body += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH, dtype='auto')",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    if license == "gemma":
        body += ["The weights are subject to the [Gemma Terms of Use](https://ai.google.dev/gemma/terms).", ""]
    return "\n".join(front + body)


def merge_to_fp16(
    base: str | Path,
    adapter: str | Path,
    output_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    merge_base: MergeBase = "original",
    quant_dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    verify: bool = False,
    allow_pickle: bool = False,
    datasets: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    gguf_file: str | None = None,
    **load_kwargs: Any,
) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a standalone ``dtype`` model to ``output_dir``.

    Writes safetensors shards (``max_shard_size``, default 2 GB), the tokenizer (the adapter's if it was saved with
    one), the generation config and a model card. The directory appears only when complete; an existing one is
    refused unless ``overwrite=True``.

    ``quant_dtype`` (``merge_base="nf4"``) is the dtype the base was loaded in for 4-bit quantisation during
    training, since NF4 of a bf16 tensor and of its fp32 copy differ; by default the one :func:`build_qlora_model`
    picks on this machine (:func:`~persian_qlora.modeling.resolve_dtype`: bf16 on a GPU that has it, else fp32).
    Pass it when merging on another kind of machine than the one that trained.

    ``verify=True`` reloads the result and reports the largest absolute logit difference against base+adapter on a
    probe conversation. Weights and the adapter are read from safetensors only, unless ``allow_pickle=True``.
    ``gguf_file`` takes a GGUF base as the builders do: its cached bf16 conversion
    (:func:`~persian_qlora.bases.gguf_base`) is the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persian_qlora.modeling import load_adapter, resolve_dtype

    if merge_base not in ("original", "nf4"):
        raise ValueError(f"merge_base must be 'original' or 'nf4', got {merge_base!r}")
    if gguf_file is not None:
        from persian_qlora.bases import gguf_base

        base = gguf_base(base, gguf_file)
    base, adapter, output_dir = str(base), Path(adapter), Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise PersianQLoRAError(f"{output_dir} already exists; choose another directory or pass overwrite=True")
    load_kwargs.setdefault("use_safetensors", None if allow_pickle else True)  # None: either format
    adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").exists() else base)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **load_kwargs)
    if merge_base == "nf4":
        count = _dequantize_nf4_into(model, base, resolve_dtype(quant_dtype), load_kwargs)
        logger.info("replaced %d linear weights with their NF4 round trip", count)
    model = load_adapter(model, adapter, allow_pickle=allow_pickle)
    reference = _probe_logits(model, tokenizer) if verify else None
    model = model.merge_and_unload()
    _check_finite(model, "after merging in fp32")
    model = model.to(dtype)
    _check_finite(model, f"after casting to {dtype}")
    model.config.use_cache = True

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(model, output_dir.parent)
    with staged_directory(output_dir) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        card = render_model_card(
            base=base,
            adapter_config=adapter_config,
            merge_base=merge_base,
            dtype=dtype,
            datasets=datasets,
            metrics=metrics,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")  # inside staging: atomic with the rest
        max_diff = None
        if reference is not None:
            reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
            max_diff = float((_probe_logits(reloaded, tokenizer) - reference).abs().max())
            logger.info("merged vs base+adapter: max |logit difference| = %.3g", max_diff)
    return MergeResult(output_dir=output_dir, merge_base=merge_base, dtype=dtype, max_abs_logit_diff=max_diff)


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Upload a merged model (or an adapter) directory, model card included, to a hub model repository.

    Training leftovers in an adapter directory (checkpoints, optimizer state, pickled training arguments) stay
    behind.
    Creates the repository if needed (private by default) and returns the commit URL. The token comes from
    ``token``, ``HF_TOKEN`` or the cached login, through huggingface_hub; it is never written anywhere. With
    ``HF_HUB_OFFLINE=1`` huggingface_hub refuses, and the local directory is left as it was.
    """
    from huggingface_hub import create_repo, upload_folder

    folder = Path(folder)
    if not (folder / "README.md").exists():
        raise PersianQLoRAError(f"{folder} has no README.md model card; push a directory written by merge_to_fp16")
    create_repo(repo_id, private=private, exist_ok=True, token=token)
    info = upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message="Upload with persian-qlora")
    return str(info.commit_url)
