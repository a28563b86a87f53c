"""The special rows of a Gemma vocabulary: which control tokens a fine-tune must train, and which no fine-tune does.

A pretrained (not instruction-tuned) Gemma has never seen its turn end (``<end_of_turn>``, Gemma 4's ``<turn|>``)
used. In Gemma 3 270M its embedding row sits among the 6,242 never-used ``<unused*>`` rows (mean cosine 0.91, up
to 0.995). The LM head is tied to those rows and frozen under LoRA, so whatever raises ``<end_of_turn>``'s logit
raises theirs too, and greedy decoding emits an ``<unused*>`` token (hidden by ``skip_special_tokens``) where the
turn should end. Two remedies, both defaults:

- train that one row (peft's ``trainable_token_indices``, which keeps the head tied and is saved with the adapter)
  when it is not distinct (:func:`indistinct_tokens`, used by :class:`~persian_qlora.modeling.LoraSettings`);
- never generate a token no fine-tune trains (:func:`untrained_token_ids`: ``<unused*>``, media placeholders,
  padding and the like), in :func:`~persian_qlora.generation.generate` and chat.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from persian_qlora.families import never_generated_tokens

__all__ = ["indistinct_tokens", "untrained_token_ids"]

_UNUSED = re.compile(r"<unused\d+>")


def untrained_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens no fine-tune trains: Gemma's ``<unused*>`` reserve, media placeholders, padding (the
    turn formats' ``never_generated``, :mod:`persian_qlora.families`)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in never_generated_tokens() if t in vocab]
    ids += [i for t, i in vocab.items() if _UNUSED.fullmatch(t)]
    return sorted(set(ids))


def indistinct_tokens(
    embedding: torch.Tensor,
    token_ids: Sequence[int],
    *,
    similarity: float = 0.9,
    neighbours: int = 10,
) -> list[int]:
    """The ``token_ids`` whose embedding rows have at least ``neighbours`` other rows within cosine ``similarity``.

    Such a row cannot be told apart by a frozen tied head: raising its logit raises its neighbours' as much. Rows
    are compared a block at a time, in fp32, so a 262k-row vocabulary needs no 262k × 262k matrix.
    """
    found = []
    with torch.no_grad():
        for token in token_ids:
            row = embedding[token].float()
            close = 0
            for block in embedding.split(16384):
                cosine = torch.nn.functional.cosine_similarity(block.float(), row[None], dim=-1)
                close += int((cosine >= similarity).sum())
            if close - 1 >= neighbours:  # the row itself is always within
                found.append(token)
    return found
