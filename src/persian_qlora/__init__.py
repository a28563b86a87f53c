"""persian-qlora: fine-tune Gemma chat models on Persian conversations with QLoRA or LoRA, vendor-neutral."""

from __future__ import annotations

from persian_qlora.collator import GemmaChatCollator
from persian_qlora.dataset import DatasetStats, PersianChatDataset, bundled_corpus_path, clean_conversation
from persian_qlora.errors import InvalidRecordError, PersianQLoRAError, TemplateError
from persian_qlora.masking import GemmaTurnMarkers, model_turn_labels
from persian_qlora.normalize import NormalizerConfig, normalize_persian
from persian_qlora.testing import gemma3_chat_template

__version__ = "0.1.0"

__all__ = [
    "DatasetStats",
    "GemmaChatCollator",
    "GemmaTurnMarkers",
    "InvalidRecordError",
    "NormalizerConfig",
    "PersianChatDataset",
    "PersianQLoRAError",
    "TemplateError",
    "__version__",
    "bundled_corpus_path",
    "clean_conversation",
    "gemma3_chat_template",
    "model_turn_labels",
    "normalize_persian",
]
