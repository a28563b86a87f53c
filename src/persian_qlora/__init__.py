"""persian-qlora: fine-tune Gemma chat models on Persian conversations with QLoRA or LoRA, vendor-neutral.

The public names below are imported on first use (PEP 562), so that ``import persian_qlora`` and the data tools
do not pay for importing transformers' Trainer, bitsandbytes and peft (several seconds).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "bases": ["gguf_base", "prepare_base", "prepare_gguf_base"],
    "behaviour": ["BehaviourScores", "Verdict", "behaviour_scores", "verdict"],
    "chat": ["ChatSession"],
    "collator": ["GemmaChatCollator"],
    "compare": ["CompareConfig", "compare", "demo_config"],
    "dataset": ["DatasetStats", "PersianChatDataset", "bundled_corpus_path", "clean_conversation"],
    "errors": [
        "ConfigError",
        "InvalidRecordError",
        "MissingExtraError",
        "NonFiniteError",
        "PersianQLoRAError",
        "TemplateError",
    ],
    "export": ["GGUFExport", "export_adapter_gguf", "export_gguf"],
    "generation": ["GenerationResult", "evaluation_pairs", "generate", "load_for_inference", "stream_reply"],
    "loss": ["chunked_causal_lm_loss"],
    "masking": ["GemmaTurnMarkers", "model_turn_labels"],
    "merging": ["MergeResult", "merge_to_fp16", "push_to_hub"],
    "metrics": ["corpus_scores", "sentence_scores"],
    "modeling": ["LoraSettings", "build_lora_model", "build_qlora_model", "default_bnb_config"],
    "normalize": ["NormalizerConfig", "normalize_persian"],
    "perplexity": ["perplexity"],
    "chat_template": ["gemma3_chat_template", "gemma4_chat_template"],
    "training": ["RunConfig", "RunMetricsCallback", "TrainConfig", "make_trainer", "run_training"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_MODULE_OF, "__version__"])


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'persian_qlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"persian_qlora.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """Keeps an exported function from being replaced by its own module: importing ``persian_qlora.compare`` (or
    ``.perplexity``) binds the module to the package attribute of the same name, so that ``from persian_qlora import
    compare`` would then give the module, not the function. ``from persian_qlora.compare import ...`` still works."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from persian_qlora.bases import gguf_base, prepare_base, prepare_gguf_base
    from persian_qlora.behaviour import BehaviourScores, Verdict, behaviour_scores, verdict
    from persian_qlora.chat import ChatSession
    from persian_qlora.chat_template import gemma3_chat_template, gemma4_chat_template
    from persian_qlora.collator import GemmaChatCollator
    from persian_qlora.compare import CompareConfig, compare, demo_config
    from persian_qlora.dataset import DatasetStats, PersianChatDataset, bundled_corpus_path, clean_conversation
    from persian_qlora.errors import (
        ConfigError,
        InvalidRecordError,
        MissingExtraError,
        NonFiniteError,
        PersianQLoRAError,
        TemplateError,
    )
    from persian_qlora.export import GGUFExport, export_adapter_gguf, export_gguf
    from persian_qlora.generation import GenerationResult, evaluation_pairs, generate, load_for_inference, stream_reply
    from persian_qlora.loss import chunked_causal_lm_loss
    from persian_qlora.masking import GemmaTurnMarkers, model_turn_labels
    from persian_qlora.merging import MergeResult, merge_to_fp16, push_to_hub
    from persian_qlora.metrics import corpus_scores, sentence_scores
    from persian_qlora.modeling import LoraSettings, build_lora_model, build_qlora_model, default_bnb_config
    from persian_qlora.normalize import NormalizerConfig, normalize_persian
    from persian_qlora.perplexity import perplexity
    from persian_qlora.training import RunConfig, RunMetricsCallback, TrainConfig, make_trainer, run_training
