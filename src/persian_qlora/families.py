"""What each Gemma family is, in one table: the single place that knows where a checkpoint's language model lives,
what is never quantised or adapted, what its forward needs, and which tokens it reserves.

Everything else reads this table instead of sniffing classes, signatures or parameter names. Adding a family (say
Gemma 4) is one entry here plus its tests. A family is keyed by the checkpoint's ``config.model_type``; a multimodal
family names the text family its language model belongs to, which is what a text-only load builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persian_qlora.errors import PersianQLoRAError

__all__ = ["FAMILIES", "GemmaFamily", "family_of", "never_quantised", "reserved_tokens"]

# Gemma's chat and document markers: inside a message's text they would forge turn boundaries.
_CHAT_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>")
# Image placeholders, shared by every Gemma 3 tokenizer: in text they would claim image features that are not there.
_IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
_AUDIO_TOKENS = ("<start_of_audio>", "<end_of_audio>", "<audio_soft_token>")

# Gemma 3n's AltUp linears are clamped in place during training and break when 4-bit (checked on CPU).
_ALTUP = ("correction_coefs", "prediction_coefs", "modality_router")


@dataclass(frozen=True)
class GemmaFamily:
    """One Gemma family as persian-qlora loads, trains, merges and evaluates it."""

    model_type: str
    causal_lm_class: str  # the transformers class a load builds: text-only, or the whole multimodal model
    text_family: str | None = None  # multimodal only: the family of its language model, what text-only builds
    # Multimodal only: how the language model's weights are named in the checkpoint, as regexes onto the names of
    # the text family's causal LM. Two layouts are served on the hub: Gemma 3 (e.g. gemma-3-4b-it) was saved as
    # ``language_model.model.*``, Gemma 3n as ``model.language_model.*``.
    text_weight_names: tuple[tuple[str, str], ...] = ()
    # Top-level parts besides the language model (towers, projectors, multimodal embedders): never read by a
    # text-only load, and never quantised or adapted in a whole one.
    towers: tuple[str, ...] = ()
    # Modules of the language model that stay in 16 bits when the rest is 4-bit (matched by name, as bitsandbytes'
    # ``llm_int8_skip_modules`` does). The LM head is tied to the embedding and read by the loss.
    full_precision: tuple[str, ...] = ("lm_head",)
    per_layer_embeddings: tuple[str, ...] = ()  # Gemma 3n's per-layer token tables (2.35 B parameters in E4B)
    needs_token_type_ids: bool = False  # forward takes token_type_ids to tell text (0) from image tokens
    reserved: tuple[str, ...] = _CHAT_TOKENS + _IMAGE_TOKENS  # control tokens that must never appear in data
    # llama.cpp's name for the language model, for GGUF export; None where the export is not offered (Gemma 3n:
    # transformers cannot read a gemma3n GGUF back, so an export could not be checked; docs/export.md)
    gguf_architecture: str | None = None

    @property
    def multimodal(self) -> bool:
        return self.text_family is not None

    @property
    def never_quantised(self) -> tuple[str, ...]:
        """Module names bitsandbytes must skip: the LM head, AltUp, and every tower. transformers matches a skip name
        as a suffix or as a prefix of the full module name, and the towers sit under ``model.``."""
        return self.full_precision + tuple(f"model.{tower}" for tower in self.towers)

    def text(self) -> GemmaFamily:
        """The family of this family's language model (itself for a text-only family)."""
        return FAMILIES[self.text_family] if self.text_family else self

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.causal_lm_class)

    @staticmethod
    def final_logit_softcap(config: Any) -> float | None:
        """The cap Gemma applies to its final logits as ``c · tanh(z / c)`` (30 in Gemma 3n; none in Gemma 3)."""
        return config.get_text_config().final_logit_softcapping

    def is_tower_weight(self, name: str) -> bool:
        """Whether a checkpoint tensor belongs to a tower, in either hub layout (``x.*`` or ``model.x.*``)."""
        return name.removeprefix("model.").split(".", 1)[0] in self.towers


FAMILIES: dict[str, GemmaFamily] = {
    family.model_type: family
    for family in (
        GemmaFamily(model_type="gemma3_text", causal_lm_class="Gemma3ForCausalLM", gguf_architecture="gemma3"),
        GemmaFamily(
            model_type="gemma3",
            causal_lm_class="Gemma3ForConditionalGeneration",
            text_family="gemma3_text",
            text_weight_names=((r"^language_model\.model\.", "model."), (r"^model\.language_model\.", "model.")),
            towers=("vision_tower", "multi_modal_projector"),
            needs_token_type_ids=True,
            gguf_architecture="gemma3",
        ),
        GemmaFamily(
            model_type="gemma3n_text",
            causal_lm_class="Gemma3nForCausalLM",
            full_precision=("lm_head", *_ALTUP),
            per_layer_embeddings=("embed_tokens_per_layer",),
            reserved=_CHAT_TOKENS + _IMAGE_TOKENS + _AUDIO_TOKENS,
        ),
        GemmaFamily(
            model_type="gemma3n",
            causal_lm_class="Gemma3nForConditionalGeneration",
            text_family="gemma3n_text",
            text_weight_names=((r"^model\.language_model\.", "model."),),
            towers=("vision_tower", "audio_tower", "embed_vision", "embed_audio"),
            full_precision=("lm_head", *_ALTUP),
            per_layer_embeddings=("embed_tokens_per_layer",),
            reserved=_CHAT_TOKENS + _IMAGE_TOKENS + _AUDIO_TOKENS,
        ),
    )
}


def family_of(config_or_model: Any) -> GemmaFamily:
    """The family of a config or a model (peft-wrapped too), by ``config.model_type``."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise PersianQLoRAError(
            f"model_type {model_type!r} is not a Gemma family persian-qlora knows ({', '.join(sorted(FAMILIES))}); "
            "fine-tune a Gemma 3 or Gemma 3n checkpoint, or add the family to persian_qlora.families.FAMILIES"
        )
    return family


def never_quantised() -> list[str]:
    """Every family's unquantised module names: the skip list of a quantisation config made before the family is
    known (a name absent from the model changes nothing)."""
    return list(dict.fromkeys(name for family in FAMILIES.values() for name in family.never_quantised))


def reserved_tokens() -> tuple[str, ...]:
    """Every control token of every family: what no message text may contain, whichever model it will train."""
    return tuple(dict.fromkeys(token for family in FAMILIES.values() for token in family.reserved))
