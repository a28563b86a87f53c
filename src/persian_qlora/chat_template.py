"""Gemma's official chat templates, shipped with the package: pretrained (not instruction-tuned) checkpoints and GGUF
files carry none, and persian-qlora attaches them. The turn formats that use them are in
:mod:`persian_qlora.families`."""

from __future__ import annotations

from persian_qlora.families import GEMMA3_TURNS, GEMMA4_TURNS

__all__ = ["gemma3_chat_template", "gemma4_chat_template"]


def gemma3_chat_template() -> str:
    """The exact chat template that Google ships with Gemma 3 (and Gemma 3n) instruction-tuned tokenizers."""
    return GEMMA3_TURNS.chat_template()


def gemma4_chat_template() -> str:
    """Gemma 4's official chat template, the newest revision (TRL 1.16's ``gemma4_v5.jinja``, as
    ``google/gemma-4-E2B-it`` ships it at commit 8995379)."""
    return GEMMA4_TURNS.chat_template()
