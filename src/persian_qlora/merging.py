"""`merge_to_fp16`: fold a LoRA adapter into its base checkpoint tensor by tensor, and ship the whole checkpoint.

The merge streams: each tensor of the base's safetensors shards is read on its own (a block of rows at a time for
the large ones), the adapter is folded into it in fp32, W = W0 + scale·(B A), the result is cast to the output
dtype and appended to the output shard being written. Every other tensor (towers, embeddings, per-layer
embeddings, norms) is copied unchanged, byte for byte when the output dtype is the stored one. Memory grows with
the largest linear weight, not with the model: no model is built, on any device.

The output is the base checkpoint with the adapter folded in: its own tensor names, config and architecture (a
merged Gemma 3n E4B loads as ``Gemma3nForConditionalGeneration`` with its towers), tokenizer, chat template,
generation and processor configs, and a model card. "16" in the name is the output's width: **bf16** by default,
fp16 on request (refused when an fp16 forward overflows), or fp32.

Two choices of W0 (``merge_base``):

- ``"original"``: the stored 16-bit weights. With a QLoRA adapter the result differs from what training saw by the
  NF4 quantisation error.
- ``"nf4"``: the NF4 round trip of every weight the 4-bit loader quantised, made with the settings recorded beside
  the adapter at training (``base_loading.json``): the trained QLoRA model, up to the output dtype's rounding.

See docs/merging.md for the trade-off, the adapter kinds, what ``verify`` compares and the memory it takes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from persian_qlora._adapter_edits import read_adapter
from persian_qlora._files import require_free_space, staged_directory
from persian_qlora._merge_plan import (
    NF4Settings,
    TrainedModel,
    check_written,
    nf4_settings,
    plan_outputs,
    trained_text_only,
    write_output,
)
from persian_qlora._shards import (
    PlannedTensor,
    ShardWriter,
    plan_shards,
    planned_bytes,
    read_checkpoint,
)
from persian_qlora.errors import PersianQLoRAError
from persian_qlora.families import GemmaFamily, family_of
from persian_qlora.loading import BaseLoading, config_fingerprint, read_provenance

__all__ = ["MergeResult", "merge_to_fp16", "push_to_hub", "render_model_card"]

logger = logging.getLogger("persian_qlora")

MergeBase = Literal["original", "nf4"]
_MERGE_BASE_WORDS = {"original": "the original 16-bit weights", "nf4": "the NF4-dequantized weights it was trained on"}
_OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_PROBE = [
    {"role": "user", "content": "سلام! لطفاً در یک جمله بگو تخت جمشید کجاست."},
    {"role": "assistant", "content": "تخت جمشید در نزدیکی شیراز، در استان فارس است."},
]
# Files of a checkpoint that are not copied: its weights (rewritten), config (rewritten) and card (rewritten).
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.safetensors\.index\.json$")
_REWRITTEN = ("config.json", "README.md")
_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What a hub snapshot needs for a merge: weights in safetensors, configs, tokenizer, chat template, licence texts.
_HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "*.txt",
    "LICENSE*",
]


@dataclass
class MergeResult:
    output_dir: Path
    merge_base: MergeBase
    dtype: torch.dtype
    max_abs_logit_diff: float | None  # verify=True: merged model vs base+adapter on a probe conversation
    merged_tensors: int = 0  # tensors the adapter (or the NF4 round trip) changed
    copied_tensors: int = 0  # tensors written unchanged (byte-identical when the dtype is the stored one)
    tied_head: bool = True  # False when the adapter trained the LM head and the embedding apart: both are written
    # verify: the largest share of an update ΔW lost to the output dtype's rounding, and the tensor it is in
    update_rounding: float | None = None
    update_rounding_tensor: str | None = None


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
    short_targets = sorted({t.rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, list) else [targets]
    scale = "alpha/√r (rsLoRA)" if adapter_config.get("use_rslora") else "alpha/r"
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
        f"- merge base: `{merge_base}` ({_MERGE_BASE_WORDS[merge_base]}), merged in fp32 as W = W0 + (B A)·{scale}",
    ]
    if adapter_config.get("trainable_token_indices"):
        body.append(f"- trained token rows: {adapter_config['trainable_token_indices']}")
    if adapter_config.get("modules_to_save"):
        body.append(f"- trained whole: {', '.join(adapter_config['modules_to_save'])}")
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
    dtype: torch.dtype = torch.bfloat16,
    merge_base: MergeBase = "original",
    quant_dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    verify: bool | Literal["tensors"] = False,
    allow_pickle: bool = False,
    datasets: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    gguf_file: str | None = None,
    strict: bool = False,
    **hub_kwargs: Any,
) -> MergeResult:
    """Merge ``adapter`` into the checkpoint ``base`` (a directory or hub id) and write the whole checkpoint,
    adapter folded in, to ``output_dir`` in ``dtype``: **bf16 by default**, fp16 or fp32 on request ("16" in the
    name is the output's width, not fp16). ``base`` is named for its role, the checkpoint the adapter was trained on;
    the functions that load any checkpoint call it ``model``.

    Streams tensor by tensor, so memory stays near the size of the largest weight (see docs/merging.md). Writes
    safetensors shards of at most ``max_shard_size`` (default 2 GB) with their index, the base's config (its dtype
    set to ``dtype``), tokenizer files (the adapter's when training saved them), chat template, generation and
    processor configs, and a model card. The directory appears only when complete; an existing one is refused
    unless ``overwrite=True``. Base weights must be safetensors; the adapter too, unless ``allow_pickle=True``.

    ``merge_base="nf4"`` re-makes the NF4 weights the adapter was trained against from the adapter's
    ``base_loading.json``; ``quant_dtype`` only confirms the dtype the base was quantised from (a contradiction is
    refused), or, for an adapter saved without the record, states it (persian-qlora's default NF4 settings are then
    assumed). ``dtype=torch.float16`` is refused when an fp16 forward of the merged model on a probe conversation
    is not finite (Gemma's activations overflow fp16).

    ``verify=True`` re-reads every written tensor and compares it bit for bit with its source or its recomputed
    merge (reporting how much of each update the output dtype's rounding lost), then runs a probe conversation
    through base+adapter and through the merged model, one after the other, and reports the largest logit
    difference. The probe holds one fp32 copy of the model; ``verify="tensors"`` runs the per-tensor check alone,
    in the merge's own memory (see docs/merging.md).
    The base is checked against the one recorded at training (``base_loading.json``): its name and its config's
    fingerprint (:func:`~persian_qlora.loading.config_fingerprint`). A difference is logged as a warning, or, with
    ``strict=True``, refused (as is an adapter with no such record).
    ``gguf_file`` takes a GGUF base as the builders do (its cached bf16 conversion is the base). ``hub_kwargs``
    (``revision``, ``token``, ``cache_dir``...) go to ``huggingface_hub.snapshot_download`` for a hub id.
    """
    from transformers import AutoConfig
    from transformers.utils.hub import convert_file_size_to_int

    if merge_base not in ("original", "nf4"):
        raise ValueError(f"merge_base must be 'original' or 'nf4', got {merge_base!r}")
    if verify not in (False, True, "tensors"):
        raise ValueError(f"verify must be False, True or 'tensors', got {verify!r}")
    if dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise PersianQLoRAError(f"{output_dir} already exists; choose another directory or pass overwrite=True")
    base_dir = _local_checkpoint(base, gguf_file, hub_kwargs)
    lora = read_adapter(adapter, allow_pickle=allow_pickle)
    config = AutoConfig.from_pretrained(base_dir)
    family = family_of(config)
    record = read_provenance(adapter)
    _check_recorded_base(record, base, config, lora.directory, strict=strict)
    text_only = trained_text_only(family, record, lora)
    nf4 = nf4_settings(merge_base, quant_dtype, record, family, lora.directory)
    trained = TrainedModel(family, config, text_only)
    stored = read_checkpoint(base_dir)
    outputs, tied_head = plan_outputs(stored, lora, trained, nf4, dtype)

    shards = plan_shards(
        [PlannedTensor(o.name, o.dtype, o.source.shape) for o in outputs], convert_file_size_to_int(max_shard_size)
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    side_files = _side_files(base_dir, lora.directory)
    needed = planned_bytes(shards) + sum(p.stat().st_size for p in side_files.values())
    require_free_space(output_dir.parent, needed + 16 * 2**20, "the merged model")  # + the card, fs bookkeeping
    result = MergeResult(output_dir=output_dir, merge_base=merge_base, dtype=dtype, max_abs_logit_diff=None)
    with staged_directory(output_dir) as staging:
        writer = ShardWriter(staging, shards)
        try:
            for output in outputs:
                write_output(output, writer)
            writer.close()
        finally:
            writer.abort()
        result.merged_tensors = sum(o.changed for o in outputs)
        result.copied_tensors = len(outputs) - result.merged_tensors
        result.tied_head = tied_head
        for name, path in side_files.items():
            shutil.copyfile(path, staging / name)
        _write_config(base_dir / "config.json", staging / "config.json", dtype, untie=not tied_head)
        card = render_model_card(
            base=str(base),
            adapter_config=lora.config,
            merge_base=merge_base,
            dtype=dtype,
            datasets=datasets,
            metrics=metrics,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")  # inside staging: atomic with the rest
        if dtype == torch.float16:
            _refuse_fp16_overflow(staging, family, text_only)
        if verify:
            result.update_rounding, result.update_rounding_tensor = check_written(outputs, staging)
        if verify is True:
            reference = _reference_logits(base_dir, lora.directory, family, text_only, nf4, allow_pickle, staging)
            merged = _probe_logits(_load_merged(staging, family, text_only, torch.float32), staging)
            result.max_abs_logit_diff = float((merged - reference).abs().max())
            logger.info("merged vs base+adapter: max |logit difference| = %.3g", result.max_abs_logit_diff)
    logger.info(
        "merged %d tensors and copied %d into %s (%s)", result.merged_tensors, result.copied_tensors, output_dir, dtype
    )
    return result


def _same_name(recorded: str, given: str) -> bool:
    """Whether two base names mean one checkpoint: equal, the same folder, or a hub id and its cached snapshot."""
    if recorded == given or Path(recorded).expanduser().resolve() == Path(given).expanduser().resolve():
        return True
    cached = f"models--{recorded.replace('/', '--')}"
    return "/" in recorded and cached in Path(given).parts


def _check_recorded_base(
    record: BaseLoading | None, base: str | Path, config: Any, adapter_dir: Path, *, strict: bool
) -> None:
    """Warn (refuse with ``strict``) when ``base`` is not the checkpoint the adapter was trained on, by name or by
    config: a ``-pt`` base instead of the ``-it`` one has the same shape, so the merge would succeed silently."""
    if record is None:
        if strict:
            raise PersianQLoRAError(
                f"{adapter_dir} has no base_loading.json, so its base cannot be checked; merge with strict=False"
            )
        return
    problems = []
    if not _same_name(record.base, str(base)):
        problems.append(f"it was trained on {record.base!r}, not {str(base)!r}")
    if record.base_config_hash is None:
        if strict:
            problems.append("its record predates config fingerprints, so the config cannot be checked")
    elif record.base_config_hash != config_fingerprint(config):
        problems.append(f"{base}'s config differs from the config of the base it was trained on")
    if not problems:
        return
    message = f"the adapter in {adapter_dir} may not belong to this base: {'; '.join(problems)}"
    if strict:
        raise PersianQLoRAError(f"{message}. Merge into the base it was trained on, or pass strict=False")
    logger.warning("%s; merging anyway (strict=True refuses)", message)


def _local_checkpoint(base: str | Path, gguf_file: str | None, hub_kwargs: dict[str, Any]) -> Path:
    """The base's local directory: as given, the cached conversion of a GGUF file, or a hub snapshot of the files a
    merge reads (safetensors weights, configs, tokenizer)."""
    if gguf_file is not None:
        from persian_qlora.bases import gguf_base

        return Path(gguf_base(base, gguf_file))
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(base), allow_patterns=_HUB_PATTERNS, **hub_kwargs))


def _side_files(base_dir: Path, adapter_dir: Path) -> dict[str, Path]:
    """Every non-weight file the output carries, by name: the base's (tokenizer, chat template, generation and
    processor configs, licence...), with the adapter's tokenizer files instead when training saved them."""
    files = {
        p.name: p
        for p in sorted(base_dir.iterdir())
        if p.is_file() and not p.name.startswith(".") and not _WEIGHT_FILE.match(p.name) and p.name not in _REWRITTEN
    }
    if (adapter_dir / "tokenizer_config.json").exists():
        for name in _TOKENIZER_FILES:
            files.pop(name, None)
            if (adapter_dir / name).exists():
                files[name] = adapter_dir / name
    return files


def _write_config(source: Path, target: Path, dtype: torch.dtype, *, untie: bool) -> None:
    """The base's config.json, with its dtype entries set to the output's and, when the head was trained apart from
    the embedding, ``tie_word_embeddings`` false (written where the base leaves it to its default too); copied byte
    for byte when nothing changes."""
    config = json.loads(source.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")

    def update(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("dtype", "torch_dtype") and isinstance(value, str):
                    node[key] = name
                elif key == "tie_word_embeddings" and untie:
                    node[key] = False
                else:
                    update(value)

    changed = json.loads(json.dumps(config))
    update(changed)
    if untie:  # also where the key is absent: its default (true) would re-tie the written head on load
        for node in (changed, changed.get("text_config")):
            if isinstance(node, dict):
                node["tie_word_embeddings"] = False
    if changed == config:
        shutil.copyfile(source, target)
    else:
        target.write_text(json.dumps(changed, indent=2) + "\n", encoding="utf-8")


def _load_merged(directory: Path, family: GemmaFamily, text_only: bool, dtype: torch.dtype) -> nn.Module:
    """The merged checkpoint as transformers loads it, in ``dtype``, built as the adapter was trained (its language
    model alone, renamed as :func:`~persian_qlora.loading.load_base` renames it). Not load_base itself: that refuses
    fp16, which is exactly what the fp16 probe must run."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    built = family
    if text_only and family.multimodal:
        built = family.text()
        kwargs.update(config=config.get_text_config(), key_mapping=dict(family.text_weight_names))
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)  # a text-only load reports every tower tensor as unexpected
    try:
        return built.model_class().from_pretrained(directory, dtype=dtype, **kwargs).eval()
    finally:
        transformers_logger.setLevel(level)


def _probe_logits(model: nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.apply_chat_template(_PROBE, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model.eval()(input_ids=ids.to(model.device)).logits.float().cpu()
    del model
    return logits


def _refuse_fp16_overflow(directory: Path, family: GemmaFamily, text_only: bool) -> None:
    logits = _probe_logits(_load_merged(directory, family, text_only, torch.float16), directory)
    if not torch.isfinite(logits).all():
        raise PersianQLoRAError(
            "the merged model's fp16 forward on a probe conversation gives inf/NaN logits: Gemma's activations "
            "overflow fp16. Merge into bf16 (dtype=torch.bfloat16, the default) or fp32"
        )


def _reference_logits(
    base_dir: Path,
    adapter_dir: Path,
    family: GemmaFamily,
    text_only: bool,
    nf4: NF4Settings | None,
    allow_pickle: bool,
    tokenizer_dir: Path,
) -> torch.Tensor:
    """Probe logits of base + adapter, unmerged, in fp32: with ``nf4``, the 4-bit base made as in training (the
    trained QLoRA model); else the stored base."""
    from transformers import BitsAndBytesConfig

    from persian_qlora.loading import load_base
    from persian_qlora.modeling import _disable_cpu_weight_repacking, load_adapter

    quantization = None
    if nf4 is not None:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=nf4.quant_type,
            bnb_4bit_use_double_quant=nf4.double_quant,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=nf4.quant_storage,
            llm_int8_skip_modules=list(nf4.skip_modules),
        )
    model, _ = load_base(
        base_dir,
        text_only=text_only and family.multimodal,
        dtype=nf4.load_dtype if nf4 is not None else torch.float32,
        quantization_config=quantization,
        per_layer_embeddings_on_host=False,
    )
    if nf4 is not None:
        _disable_cpu_weight_repacking(model)
    return _probe_logits(load_adapter(model, adapter_dir, allow_pickle=allow_pickle), tokenizer_dir)


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
