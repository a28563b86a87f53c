"""Batch collation for training: Gemma turn labels, and either padding-free rows or right padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from persian_qlora.families import family_of
from persian_qlora.masking import IGNORE_INDEX, GemmaTurnMarkers, model_turn_labels

__all__ = ["GemmaChatCollator"]


class GemmaChatCollator:
    """Collate tokenized Gemma conversations into a training batch.

    Each feature needs ``input_ids``; its ``labels`` are used when present (as :class:`PersianChatDataset` gives
    them) and computed from the Gemma turn markers otherwise.

    ``padding_free=True`` puts the batch's conversations end to end in one row with ``position_ids`` restarting at
    each conversation and no ``attention_mask`` (transformers' ``DataCollatorWithFlattening``): no pad token is
    computed, and attention stays within each conversation (transformers derives the block mask from the
    ``position_ids`` for sdpa/eager, and FlashAttention reads them as sequence boundaries). The model must run with
    ``use_cache=False`` then, or the sdpa/eager mask lets a conversation see its neighbour; the trainer does so.

    Otherwise rows are padded on the right, whatever the tokenizer's ``padding_side`` (that one is for
    generation); padded positions get label -100 and attention 0.

    ``return_token_type_ids`` adds zeros (text tokens are type 0) for the families whose forward reads them, such
    as the whole multimodal Gemma 3; :meth:`for_model` sets it from the model's family
    (:mod:`persian_qlora.families`).
    """

    def __init__(
        self,
        tokenizer,
        *,
        padding_free: bool = False,
        pad_to_multiple_of: int | None = None,
        return_token_type_ids: bool = False,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; Gemma tokenizers use '<pad>' (id 0)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if padding_free and pad_to_multiple_of is not None:
            raise ValueError("pad_to_multiple_of pads rows; a padding-free batch has none to pad")
        self.markers = GemmaTurnMarkers.from_tokenizer(tokenizer)
        self.pad_token_id: int = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.return_token_type_ids = return_token_type_ids

    @classmethod
    def for_model(cls, tokenizer, model, **kwargs: Any) -> GemmaChatCollator:
        """A collator that adds ``token_type_ids`` exactly when the model's family needs them."""
        return cls(tokenizer, return_token_type_ids=family_of(model).needs_token_type_ids, **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = [list(f["input_ids"]) for f in features]
        labels = [
            list(f["labels"]) if f.get("labels") is not None else model_turn_labels(ids, self.markers)
            for f, ids in zip(features, rows, strict=True)
        ]
        for i, (ids, row_labels) in enumerate(zip(rows, labels, strict=True)):
            if len(row_labels) != len(ids):
                raise ValueError(f"feature {i}: {len(row_labels)} labels for {len(ids)} input_ids")
        if self.padding_free:
            batch = self._flatten([{"input_ids": ids, "labels": lab} for ids, lab in zip(rows, labels, strict=True)])
        else:
            batch = self._pad(rows, labels)
        if self.return_token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch

    def _pad(self, rows: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, row_labels) in enumerate(zip(rows, labels, strict=True)):
            batch_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            batch_labels[i, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
            attention[i, : len(ids)] = 1
        return {"input_ids": batch_ids, "attention_mask": attention, "labels": batch_labels}
