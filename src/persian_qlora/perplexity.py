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
    of its items. They are collated with :class:`~persian_qlora.GemmaChatCollator` (right padding, by similar
    length) and scored with training's lean loss (:func:`~persian_qlora.loss.lean_model_loss`), which
    projects only the labelled positions onto the vocabulary. The result does not depend on ``batch_size`` beyond
    float rounding.
    """
    from persian_qlora.collator import GemmaChatCollator
    from persian_qlora.loss import lean_model_loss

    collator = GemmaChatCollator.for_model(tokenizer, model)
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            features = [dataset[i] for i in order[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collator(features).items()}
            labels = batch.pop("labels")
            # Only the labelled positions meet the 262k-token vocabulary; num_items_in_batch=1 keeps the sum.
            total_nll += float(lean_model_loss(model, labels, num_items_in_batch=1, **batch, use_cache=False))
            total_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())  # the loss shifts labels by one
    if was_training:
        model.train()
    return math.exp(total_nll / total_tokens)
