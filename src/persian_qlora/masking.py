"""Gemma turn masking: which tokens of a rendered conversation are trained.

A Gemma conversation is ``<bos>`` then turns ``START ROLE\\n CONTENT END\\n``, where START/END are the tokenizer's
turn format's markers (:func:`~persian_qlora.families.turn_format_of`): ``<start_of_turn>``/``<end_of_turn>`` in
Gemma 3 and 3n, ``<|turn>``/``<turn|>`` in Gemma 4. We train each model turn's content tokens and its END (the token
that teaches the model to stop), in every model turn, not only the last. The ``\\n`` after END is *not* trained:
generation stops at END, so the model never produces it. (TRL's ``gemma3_training.jinja`` trains that ``\\n`` too;
see docs/data.md. TRL has no Gemma 4 training template at all.)

Masks come from token ids alone: we find START followed by the token ids of ``model\\n`` exactly as this tokenizer
encodes them, so the rule holds for any tokenizer carrying Gemma's template and never decodes Persian text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from persian_qlora.errors import TemplateError
from persian_qlora.families import TurnFormat, turn_format_of

__all__ = ["IGNORE_INDEX", "GemmaTurnMarkers", "model_turn_labels"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class GemmaTurnMarkers:
    """The token ids that delimit Gemma turns in one tokenizer's vocabulary."""

    start_of_turn: int
    end_of_turn: int
    model_header: tuple[int, ...]  # the ids of "model\n" right after the start marker
    turns: TurnFormat

    @classmethod
    def from_tokenizer(cls, tokenizer) -> GemmaTurnMarkers:
        """Look the markers up, and check that the tokenizer's chat template renders Gemma turns with them."""
        turns = turn_format_of(tokenizer)
        ids = {}
        for token in (turns.start_of_turn, turns.end_of_turn):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise TemplateError(
                    f"the tokenizer has no single token {token!r}; persian-qlora trains Gemma chat models and "
                    "needs a Gemma tokenizer (or one built by persian_qlora.tiny.build_tiny_tokenizer)"
                )
            ids[token] = token_id
        header = tokenizer.encode(f"{turns.start_of_turn}{turns.model_role}\n", add_special_tokens=False)
        markers = cls(ids[turns.start_of_turn], ids[turns.end_of_turn], tuple(header[1:]), turns)

        fix = f"tokenizer.chat_template = persian_qlora.families.TURN_FORMATS[{turns.name!r}].chat_template()"
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"the tokenizer has no chat template; set {fix} to use {turns.name}'s")
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        probe_ids = tokenizer.encode(tokenizer.apply_chat_template(probe, tokenize=False), add_special_tokens=False)
        trained = [t for t in model_turn_labels(probe_ids, markers) if t != IGNORE_INDEX]
        if tokenizer.decode(trained) != f"y{turns.end_of_turn}":
            raise TemplateError(
                "the tokenizer's chat template does not render model turns as "
                f"'{turns.start_of_turn}model\\n...{turns.end_of_turn}'; use Gemma's template: {fix}"
            )
        return markers


def model_turn_labels(input_ids: Sequence[int], markers: GemmaTurnMarkers) -> list[int]:
    """Labels for causal-LM training: the token id inside model turns (content + the turn end), else -100.

    A model turn cut off by truncation is trained up to the cut.
    """
    ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(ids)
    header = list(markers.model_header)
    width = len(header)
    i = 0
    while i < len(ids):
        if ids[i] == markers.start_of_turn and ids[i + 1 : i + 1 + width] == header:
            i += 1 + width
            while i < len(ids):
                labels[i] = ids[i]
                i += 1
                if ids[i - 1] == markers.end_of_turn:
                    break
        else:
            i += 1
    return labels
