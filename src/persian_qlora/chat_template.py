"""The Gemma chat template: the exact Jinja template Google ships with Gemma 3 and Gemma 3n instruction-tuned
tokenizers. Pretrained (not instruction-tuned) checkpoints and GGUF files carry none; persian-qlora attaches it."""

from __future__ import annotations

from importlib import resources

__all__ = ["gemma3_chat_template"]


def gemma3_chat_template() -> str:
    """The exact chat template that Google ships with Gemma 3 (and Gemma 3n) instruction-tuned tokenizers."""
    return resources.files("persian_qlora").joinpath("data", "gemma3_chat_template.jinja").read_text(encoding="utf-8")
