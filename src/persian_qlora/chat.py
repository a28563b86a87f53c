"""A multi-turn chat session over :func:`~persian_qlora.generation.stream_reply`, for ``persian-qlora chat``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from persian_qlora.generation import AS_TRAINED, REFERENCE_SAMPLING, PromptNormalization, stream_reply

__all__ = ["ChatSession", "REFERENCE_SAMPLING"]


@dataclass
class ChatSession:
    """Keeps the conversation in Gemma's turn order; an optional system prompt opens it. User and system text reach
    the model normalised as in training (``normalize``, see :func:`~persian_qlora.generation.normalized_prompt`;
    None: as written)."""

    model: Any
    tokenizer: Any
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=lambda: dict(REFERENCE_SAMPLING))
    max_new_tokens: int = 256
    history: list[dict[str, str]] = field(default_factory=list)
    normalize: PromptNormalization = AS_TRAINED

    def reset(self) -> None:
        self.history.clear()

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def send(self, text: str) -> Iterator[str]:
        """Stream the model's reply to ``text``; user turn and reply join the history once the reply is complete."""
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in stream_reply(
                self.model,
                self.tokenizer,
                self.messages(),
                max_new_tokens=self.max_new_tokens,
                normalize=self.normalize,
                **self.sampling,
            ):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.history.pop()  # an interrupted turn leaves the history as it was
            raise
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})
