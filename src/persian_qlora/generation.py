"""Batched generation from chat conversations, shared by evaluation, the comparison and (later) chat.

Prompts are left-padded (a decoder-only model continues from the right edge), batched by similar length so little
padding is computed, and stop on both ``<eos>`` and ``<end_of_turn>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from persian_qlora.measure import PhaseMeter

__all__ = ["GenerationResult", "evaluation_pairs", "generate", "stop_token_ids"]

Conversation = list[dict[str, str]]


@dataclass
class GenerationResult:
    texts: list[str]  # in the order of the input conversations
    new_tokens: list[int]
    seconds: float
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds else 0.0


def evaluation_pairs(conversations: Sequence[Conversation]) -> tuple[list[Conversation], list[str]]:
    """Split each conversation at its last model turn: (all turns before it, that turn's text)."""
    prompts, references = [], []
    for index, conversation in enumerate(conversations):
        last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"conversation {index} has no model turn to evaluate against")
        prompts.append(list(conversation[:last]))
        references.append(conversation[last]["content"])
    return prompts, references


def stop_token_ids(tokenizer) -> list[int]:
    """``<eos>`` and ``<end_of_turn>``: Gemma ends a turn with the latter, and a base model may emit the former."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tokenizer.unk_token_id]


def generate(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    progress: bool = False,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Generate the next model turn of each conversation; return the texts in input order, with timing and memory.

    Greedy by default. Each prompt is rendered with the tokenizer's chat template and ``add_generation_prompt``;
    the reply is decoded without special tokens and stripped. Extra keyword arguments go to ``model.generate``.
    """
    from tqdm.auto import tqdm

    rendered = tokenizer.apply_chat_template(list(conversations), tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    texts: list[str] = [""] * len(encoded)
    counts: list[int] = [0] * len(encoded)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    with PhaseMeter() as meter, torch.no_grad():
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[row, width - len(encoded[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                eos_token_id=stops,
                pad_token_id=pad,
                **sampling,
                **generate_kwargs,
            )
            for row, i in enumerate(batch):
                new = output[row, width:].tolist()
                ended = next((k for k, t in enumerate(new) if t in stops), None)
                new = new if ended is None else new[: ended + 1]
                counts[i] = len(new)
                texts[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    if was_training:
        model.train()
    return GenerationResult(texts=texts, new_tokens=counts, seconds=meter.result.seconds, memory=meter.result.memory)
