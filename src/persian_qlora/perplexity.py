"""Perplexity over the model-turn tokens of a chat dataset: the tokens training is scored on, nothing else.

BLEU and ROUGE score one greedy reply; perplexity scores every reference token of every model turn, so it shows
small differences between models (such as two merges of one adapter) that greedy decoding can hide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from persian_qlora.masking import IGNORE_INDEX

__all__ = ["perplexity"]


def perplexity(model, tokenizer, dataset: Sequence[Mapping[str, Any]], *, batch_size: int = 4) -> float:
    """exp of the mean negative log-likelihood of the trained tokens (model-turn content and ``<end_of_turn>``)
    of ``dataset`` under ``model``.

    ``dataset`` holds tokenized conversations with labels: a :class:`~persian_qlora.PersianChatDataset` or a list
    of its items. They are batched with :class:`~persian_qlora.GemmaChatCollator` exactly as in training, and the
    loss is the model's own. Conversations are batched by similar length; the result does not depend on
    ``batch_size`` beyond float rounding.
    """
    from persian_qlora.collator import GemmaChatCollator

    collator = GemmaChatCollator.for_model(tokenizer, model)
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collator([dataset[i] for i in order[start : start + batch_size]])
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
            total_loss += float(loss) * tokens
            total_tokens += tokens
    if was_training:
        model.train()
    return math.exp(total_loss / total_tokens)
