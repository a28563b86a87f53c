"""Loading a Gemma base the one way persian-qlora trains, generates and merges it, and recording how.

- **Text-only by default.** A multimodal Gemma 3 or 3n checkpoint loads as its language model alone (the family's
  text class, its weights renamed from the checkpoint's layout): no tower, projector or multimodal embedder is built
  or read, and Gemma 3n needs no timm. ``text_only=False`` builds the whole model; the towers are then frozen like
  every base weight, never quantised (the family's skip list) and never adapted (LoRA targets the language model).
- **Devices and dtypes.** The model lands on the GPU when there is one (this process's device under ``accelerate
  launch``), in the compute dtype of :func:`resolve_dtype`. On CUDA, Gemma 3n's per-layer embedding tables (2.35 B
  parameters in E4B) are loaded into host memory, never onto the accelerator (the ``device_map`` given to
  ``from_pretrained`` names them, :func:`host_placement`), and only the looked-up rows travel
  (:func:`offload_per_layer_embeddings`).
- **Provenance.** :class:`BaseLoading` records how the base was loaded; the trainer saves it beside the adapter as
  ``base_loading.json``, and the merge and ``load_for_inference`` read it back, so an NF4 merge re-quantises exactly
  as training did and a mismatch is refused instead of merged silently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persian_qlora._deprecation import renamed_arguments
from persian_qlora.errors import MissingExtraError, PersianQLoRAError
from persian_qlora.families import FAMILIES, GemmaFamily, family_of, never_quantised

__all__ = [
    "PROVENANCE_FILE",
    "BaseLoading",
    "default_bnb_config",
    "host_placement",
    "hub_kwargs",
    "load_base",
    "offload_per_layer_embeddings",
    "read_provenance",
    "resolve_dtype",
]

logger = logging.getLogger("persian_qlora")

PROVENANCE_FILE = "base_loading.json"
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")
_VERSIONED = ("persian-qlora", "torch", "transformers", "peft", "bitsandbytes", "accelerate")


def hub_kwargs(load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a load that say where a checkpoint is (token, revision, cache_dir, ...): the
    tokenizer and config of a gated or pinned checkpoint need them as much as its weights do."""
    return {k: load_kwargs[k] for k in _HUB_KWARGS if k in load_kwargs}


def resolve_dtype(requested: torch.dtype | str | None = None) -> torch.dtype:
    """The compute dtype: bf16 on a GPU with native bf16 (compute capability 8.0+), else fp32. fp16 is refused.

    Gemma was trained in bf16 and overflows in fp16 (inf/NaN activations on T4-class GPUs), so fp16 compute is
    never a safe choice for it. Below compute capability 8 (T4, V100) there is no bf16 hardware: torch's
    ``is_bf16_supported()`` still says yes, counting emulation, but emulated bf16 is slow, so those GPUs compute in
    fp32 (the 4-bit weights stay 4-bit). See docs/training.md.
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
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def default_bnb_config(
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype | str | None = None,
    *,
    family: GemmaFamily | None = None,
):
    """NF4 with double quantisation, as in the QLoRA paper; the family's towers, AltUp and LM head stay unquantised.

    ``quant_storage`` is the dtype the packed 4-bit weights are stored in (default uint8). FSDP-QLoRA needs it
    equal to the dtype of the other weights (bf16), so that FSDP can flatten all parameters together. Without a
    ``family``, every family's unquantised modules are skipped.
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
        llm_int8_skip_modules=list(family.never_quantised) if family else never_quantised(),
    )


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


@dataclass(frozen=True)
class BaseLoading:
    """How a base model was loaded for training: enough to load it the same way again, or to re-make its NF4.

    ``quantization`` is None for a 16-bit (LoRA) base; for a 4-bit one it holds what bitsandbytes did, read off a
    quantised layer: quant type, block size, double quantisation and its block size, storage dtype, the device the
    weights were quantised on, and the skipped modules. ``load_dtype`` is the dtype the weights had when they were
    quantised (NF4 of a bf16 tensor and of its fp32 copy differ) and that unquantised weights are kept in.
    """

    base: str
    model_type: str  # of the checkpoint: "gemma3n" for E4B, even when its language model was loaded alone
    architecture: str  # the class that was built
    text_only: bool
    load_dtype: str
    compute_dtype: str
    quantization: dict[str, Any] | None = None
    per_layer_embeddings_on_host: bool = False
    versions: dict[str, str | None] = field(default_factory=_versions)
    # config_fingerprint() of the base's config: None in records written before persian-qlora recorded it
    base_config_hash: str | None = None

    @property
    def family(self) -> GemmaFamily:
        return FAMILIES[self.model_type]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROVENANCE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    def torch_dtype(self, which: str = "load_dtype") -> torch.dtype:
        return getattr(torch, getattr(self, which))

    def bnb_config(self, compute_dtype: torch.dtype | None = None):
        """The ``BitsAndBytesConfig`` that re-makes this base's 4-bit weights as training had them (quant type,
        double quantisation, storage dtype, skipped modules: what the nf4 merge re-makes too), or None for a 16-bit
        base. ``compute_dtype`` defaults to the recorded one."""
        if self.quantization is None:
            return None
        from transformers import BitsAndBytesConfig

        recorded = self.quantization
        if recorded.get("method") != "bitsandbytes":
            raise PersianQLoRAError(
                f"{self.base}: recorded quantisation {recorded} is not one bitsandbytes can re-make; load the base "
                "without quantization"
            )
        if recorded.get("blocksize") not in (None, 64):  # transformers' config has no block size; bnb's is 64
            logger.warning("%s was quantised in blocks of %s; loading with 64", self.base, recorded["blocksize"])
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recorded["quant_type"],
            bnb_4bit_use_double_quant=recorded["double_quant"],
            bnb_4bit_compute_dtype=compute_dtype or self.torch_dtype("compute_dtype"),
            bnb_4bit_quant_storage=getattr(torch, recorded["quant_storage"]),
            llm_int8_skip_modules=list(recorded["skip_modules"]),
        )


# Config entries that say how a checkpoint was saved, not what model it is.
_NOT_THE_MODEL = ("_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype")


def config_fingerprint(config: Any) -> str:
    """A SHA-256 of what a config says the model is (its architecture and every dimension), leaving out how it was
    saved (its path, transformers version, dtype), so that a bf16 copy or another download of the same checkpoint
    has the same fingerprint. Checkpoints of one shape (a ``-pt`` and its ``-it``) share it: the name tells those
    apart."""

    def model_only(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: model_only(value) for key, value in node.items() if key not in _NOT_THE_MODEL}
        if isinstance(node, list):
            return [model_only(value) for value in node]
        return node

    text = json.dumps(model_only(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_provenance(adapter_dir: str | Path) -> BaseLoading | None:
    """The :class:`BaseLoading` saved beside an adapter, or None for an adapter saved without one (older versions,
    or ``PeftModel.save_pretrained`` called directly)."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.exists():
        return None
    try:
        return BaseLoading(**json.loads(path.read_text(encoding="utf-8")))
    except (TypeError, ValueError) as err:
        raise PersianQLoRAError(f"{path} is not a base-loading record persian-qlora can read ({err})") from None


def _quantization_record(model: nn.Module, bnb_config) -> dict[str, Any] | None:
    """What bitsandbytes actually did, read off the first 4-bit layer (not what we asked for); None when nothing was
    quantised (no 4-bit layer, or weights left on the meta device)."""
    import bitsandbytes as bnb

    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    state = None if layer is None else layer.weight.quant_state
    if state is None:
        return None
    return {
        "method": "bitsandbytes",
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "double_quant": state.nested,
        "double_quant_blocksize": state.state2.blocksize if state.nested else None,
        "quant_storage": _dtype_name(layer.weight.quant_storage),
        "quantized_on": layer.weight.device.type,
        "skip_modules": list(bnb_config.llm_int8_skip_modules or []),
    }


def _default_device_map() -> dict[str, Any] | None:
    """This process's GPU when there is one (its local rank's under ``accelerate launch``), else none (the CPU)."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def host_placement(built: GemmaFamily, config: Any, device: Any) -> dict[str, Any]:
    """The ``device_map`` that loads the model of ``built``'s class on ``device`` with its per-layer embedding tables
    in host memory from the start. Moving them after ``from_pretrained`` would first put all of them on ``device``
    (E4B: 4.7 GB in bf16, 9.4 GB in fp32), the peak a T4 cannot afford.

    The tables ("cpu") and every module beside them on their path (``device``) are named one by one, found on a
    meta-device copy of the model (no memory). A map with a ``""`` entry would not do: accelerate, which
    ``from_pretrained`` hands a two-device map to, moves everything under ``""`` to its device first."""
    names = built.text().per_layer_embeddings
    with torch.device("meta"):
        skeleton = built.model_class()._from_config(config)
    tables = [name for name, _ in skeleton.named_modules() if name.rsplit(".", 1)[-1] in names]
    placement: dict[str, Any] = {}

    def place(module: nn.Module, prefix: str) -> None:
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            placement[prefix + name] = device
        for name, child in module.named_children():
            full = prefix + name
            if full in tables:
                placement[full] = "cpu"
            elif any(table.startswith(full + ".") for table in tables):
                place(child, full + ".")
            else:
                placement[full] = device

    place(skeleton, "")
    return placement


def _keep_on_host(model: nn.Module, device_map: dict[str, Any]) -> None:
    """Undo accelerate's CPU offload of the host-placed tables. ``from_pretrained`` dispatches a model whose device
    map has two devices, and accelerate treats a "cpu" module as offloaded: it parks the weights aside (the host
    tensors themselves, no copy) and copies them to the accelerator at every forward, which is the memory we keep off
    it. Here the hooks go and each table gets its parked host tensors back (its buffers, a scalar scale that
    accelerate put on the accelerator, come back too); :func:`offload_per_layer_embeddings`' hooks then move the
    looked-up rows only."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, remove_hook_from_submodules
    from accelerate.utils import set_module_tensor_to_device

    parked: dict[str, dict[str, torch.Tensor]] = {}
    for name in (name for name, device in device_map.items() if device == "cpu"):
        module = model.get_submodule(name)
        hook = getattr(module, "_hf_hook", None)
        for part in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if isinstance(part, AlignDevicesHook) and part.offload:
                parked[name] = {key: part.weights_map[key] for key, _ in module.named_parameters()}
                part.offload = False  # so that removing it restores nothing: we put the weights back below
    remove_hook_from_submodules(model)
    for name, tensors in parked.items():
        module = model.get_submodule(name)
        for key, value in tensors.items():
            set_module_tensor_to_device(module, key, "cpu", value=value)
        for key, buffer in module.named_buffers():
            if buffer.device.type != "meta":  # meta only where the "accelerator" is the meta device (tests)
                set_module_tensor_to_device(module, key, "cpu")


class _DropTowerReport(logging.Filter):
    """Hide transformers' load report of a text-only load: it lists every tower tensor as unexpected. We check the
    report ourselves (:func:`_check_text_only_load`) and log one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


class _DropOffloadNotice(logging.Filter):
    """Hide accelerate's notice that host-placed modules are "offloaded" to the meta device: :func:`_keep_on_host`
    undoes that offload right after the load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "offloaded to the cpu" not in record.getMessage()


def _check_text_only_load(family: GemmaFamily, path: str, info: dict[str, Any]) -> None:
    strays = [k for k in info.get("unexpected_keys", []) if not family.is_tower_weight(k)]
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("lm_head.")]  # the head is tied
    if strays or missing or info.get("mismatched_keys"):
        raise PersianQLoRAError(
            f"{path}: its language model's weights are not where a {family.model_type} checkpoint keeps them "
            f"(not found: {missing[:3]}; not understood: {strays[:3]}; size mismatches: "
            f"{list(info.get('mismatched_keys', []))[:3]}); load it whole with text_only=False, or re-save it with "
            "transformers"
        )
    logger.info("%s: language model loaded alone; %d tower tensors left unread", path, len(info["unexpected_keys"]))


def _refuse_half_quantised_experts(family: GemmaFamily, config: Any, path: str) -> None:
    """A 4-bit load of a mixture-of-experts model would quantise its attention and dense MLP and leave the experts,
    most of its weights, in 16 bits: not QLoRA, and not what a user asking for 4-bit expects. Refuse it."""
    experts = family.expert_parameters(config)
    if experts:
        raise PersianQLoRAError(
            f"{path} is a mixture-of-experts {family.model_type} checkpoint: bitsandbytes cannot quantise its 3-D "
            f"expert weights ({experts / 1e9:.2f} B parameters, {2 * experts / 1e9:.1f} GB in bf16), so a 4-bit load "
            "would leave them in 16 bits beside a 4-bit rest. Train it with 16-bit LoRA instead (build_lora_model, "
            "or --method lora: attention and dense MLP adapted, experts frozen) on a GPU that holds the whole model "
            "in bf16, or fine-tune a dense Gemma 4 (E4B, 31B) with QLoRA"
        )


@renamed_arguments(model_id_or_path="model")
def load_base(
    model: str | Path,
    *,
    text_only: bool = True,
    dtype: torch.dtype | str | None = None,
    quantization_config: Any | None = None,
    gguf_file: str | Path | None = None,
    per_layer_embeddings_on_host: bool | None = None,
    device_map: Any | None = None,
    **load_kwargs: Any,
) -> tuple[nn.Module, BaseLoading]:
    """Load the Gemma checkpoint ``model`` (hub id or directory; text-only by default) and return it with the
    record of how it was loaded.

    ``dtype`` is the compute dtype (:func:`resolve_dtype`), which unquantised weights are kept in and 4-bit
    weights are quantised from. ``per_layer_embeddings_on_host`` (default: on CUDA, outside distributed runs) keeps
    Gemma 3n's per-layer embedding tables in host memory. ``device_map`` defaults to this process's GPU, or the CPU.
    Other keyword arguments go to ``from_pretrained``; weights load from safetensors only unless
    ``use_safetensors=None`` is passed. ``gguf_file`` is converted once into a cached checkpoint
    (:func:`~persian_qlora.bases.gguf_base`).
    """
    from transformers import AutoConfig

    if gguf_file is not None:
        from persian_qlora.bases import gguf_base

        model = gguf_base(model, gguf_file)
    path = str(model)
    dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(path, **hub_kwargs(load_kwargs))
    family = family_of(config)
    fingerprint = config_fingerprint(config)  # before the load can touch the config
    load_kwargs.setdefault("use_safetensors", True)  # never unpickle weights unless the caller opts in
    device_map = device_map if device_map is not None else _default_device_map()
    text_only = text_only and family.multimodal
    built = family.text() if text_only else family
    built_config = config.get_text_config() if text_only else config
    if text_only:
        load_kwargs.update(config=built_config, key_mapping=dict(family.text_weight_names))

    on_host = per_layer_embeddings_on_host
    if on_host is None:
        on_host = torch.cuda.is_available() and _single_process()
    on_host = on_host and bool(built.text().per_layer_embeddings)
    # A whole-model map on an accelerator: the tables go to the host from the start. Another map is the caller's.
    placed = on_host and isinstance(device_map, dict) and set(device_map) == {""}
    placed = placed and torch.device(device_map[""]).type != "cpu"
    load_kwargs["device_map"] = device_map
    if quantization_config is not None:
        _refuse_half_quantised_experts(family, config, path)
        load_kwargs["quantization_config"] = quantization_config
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    accelerate_logger = logging.getLogger("accelerate.big_modeling")
    drop_report, drop_notice = _DropTowerReport(), _DropOffloadNotice()
    if text_only:
        transformers_logger.addFilter(drop_report)
    if placed:
        accelerate_logger.addFilter(drop_notice)
    try:
        if placed:  # inside the try: building the meta copy of a whole Gemma 3n needs timm too
            load_kwargs["device_map"] = host_placement(built, built_config, device_map[""])
            if quantization_config is not None:  # bitsandbytes refuses a device map with "cpu" in it without this
                load_kwargs["quantization_config"] = copy.deepcopy(quantization_config)
                load_kwargs["quantization_config"].llm_int8_enable_fp32_cpu_offload = True
        with warnings.catch_warnings():
            # accelerate checks a device map against module names; ours also names buffers, which transformers reads
            warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
            model, info = built.model_class().from_pretrained(
                path, dtype=dtype, output_loading_info=True, **load_kwargs
            )
    except ImportError as err:
        if "timm" in str(err).lower():
            raise MissingExtraError(
                f"loading the whole {family.model_type} model (its vision tower; text_only=True needs none)",
                "multimodal",
                "timm",
            ) from err
        raise
    finally:
        transformers_logger.removeFilter(drop_report)
        accelerate_logger.removeFilter(drop_notice)
    if text_only:
        _check_text_only_load(family, path, info)
    if placed:
        _keep_on_host(model, load_kwargs["device_map"])
    if on_host:
        stored = getattr(config, "dtype", None)  # the checkpoint's: bf16 for Gemma
        narrower = isinstance(stored, torch.dtype) and stored.itemsize < dtype.itemsize
        offload_per_layer_embeddings(model, storage_dtype=stored if narrower else None)
    record = BaseLoading(
        base=path,
        model_type=family.model_type,
        architecture=type(model).__name__,
        text_only=text_only,
        load_dtype=_dtype_name(dtype),
        compute_dtype=_dtype_name(
            quantization_config.bnb_4bit_compute_dtype if quantization_config is not None else dtype
        ),
        quantization=_quantization_record(model, quantization_config) if quantization_config is not None else None,
        per_layer_embeddings_on_host=on_host,
        base_config_hash=fingerprint,
    )
    return model, record


def _single_process() -> bool:
    from accelerate import PartialState

    return PartialState().num_processes == 1


def offload_per_layer_embeddings(
    model: nn.Module, host: str | torch.device = "cpu", *, storage_dtype: torch.dtype | None = None
) -> list[str]:
    """Keep Gemma 3n's per-layer embedding tables in ``host`` memory; move only the rows a batch looks up.

    In E4B the tables hold 2.35 B parameters (4.7 GB in bf16) and are read by lookup alone, a few rows per token:
    on the accelerator they would take a third of a T4. Each table moves to ``host`` once (:func:`load_base` loads
    it there in the first place); a hook sends the token ids there and brings the looked-up rows back to the device
    of the input embeddings, in the dtype the model was loaded in. The model's
    ``hf_device_map`` records the placement, so Trainer and accelerate leave it where it is. ``storage_dtype``
    stores the tables narrower on the host: exact when it is the checkpoint's own dtype (bf16 for Gemma) and the
    model was loaded wider (fp32 on a T4). Returns the names of the moved modules.
    """
    names = family_of(model).text().per_layer_embeddings
    main_device = model.get_input_embeddings().weight.device  # where the rest of the model runs
    moved = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in names:
            continue
        dtype = module.weight.dtype
        if module.weight.device == torch.device(host):  # loaded there (load_base): a cast, in place on the host
            module.to(dtype=storage_dtype or dtype)
        else:
            module.to(host, dtype=storage_dtype or dtype)
        module.register_forward_pre_hook(lambda _m, args: tuple(a.to(host) for a in args))
        module.register_forward_hook(lambda _m, _args, out, d=main_device, t=dtype: out.to(device=d, dtype=t))
        moved.append(name)
    if moved:
        device_map = dict(getattr(model, "hf_device_map", None) or {"": str(main_device)})
        device_map.update(dict.fromkeys(moved, str(torch.device(host))))
        model.hf_device_map = device_map
    return moved
