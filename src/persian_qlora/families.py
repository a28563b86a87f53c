"""What each Gemma family is, in one table: the single place that knows where a checkpoint's language model lives,
what is never quantised or adapted, what its forward needs, and which tokens it reserves.

Everything else reads this table instead of sniffing classes, signatures or parameter names. Adding a family is one
entry here plus its tests. A family is keyed by the checkpoint's ``config.model_type``; a multimodal family names the
text family its language model belongs to, which is what a text-only load builds. How a generation writes a
conversation (its turn markers, control tokens and chat template) is a :class:`TurnFormat`, shared by the families
of that generation; a tokenizer's format is found by :func:`turn_format_of`, since data is prepared before any model
is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from persian_qlora.errors import PersianQLoRAError, TemplateError

__all__ = [
    "FAMILIES",
    "GEMMA3_TURNS",
    "GEMMA4_TURNS",
    "TURN_FORMATS",
    "UNSUPPORTED",
    "GemmaFamily",
    "TurnFormat",
    "family_of",
    "never_generated_tokens",
    "never_quantised",
    "reserved_tokens",
    "turn_format_of",
]

# Rows no conversation ever contains, in every Gemma vocabulary, so no fine-tune trains them: generating one is
# always an error (see persian_qlora.tokens).
_NEVER_TRAINED = ("<pad>", "<bos>", "<unk>", "<mask>", "[multimodal]")


@dataclass(frozen=True)
class TurnFormat:
    """How one Gemma generation writes a conversation: ``<bos>`` then turns ``START role\\n content END\\n``.

    ``control`` are the chat, document, thinking and tool markers: inside a message's text they would forge turn
    boundaries, so data must not contain them. ``media`` are the image/audio/video placeholders: in text they would
    claim features that are not there, and no text fine-tune trains their rows. ``template_file`` is the official
    chat template, shipped in ``persian_qlora/data``; ``ollama_template`` is the same in Ollama's Go syntax, where an
    export offers one.
    """

    name: str
    start_of_turn: str
    end_of_turn: str
    template_file: str
    control: tuple[str, ...]
    media: tuple[str, ...]
    ollama_template: str | None = None
    model_role: str = "model"

    def chat_template(self) -> str:
        """The exact official chat template of this generation's instruction-tuned tokenizers."""
        return resources.files("persian_qlora").joinpath("data", self.template_file).read_text(encoding="utf-8")

    @property
    def never_generated(self) -> tuple[str, ...]:
        """Tokens no text fine-tune trains: padding and document markers, and the media placeholders."""
        return _NEVER_TRAINED + self.media


# Gemma 3's chat template (data/gemma3_chat_template.jinja) in Ollama's Go-template syntax: a system message opens the
# first user turn, followed by a blank line; an unfinished last model turn is left open.
_OLLAMA_GEMMA3_TEMPLATE = """{{- $system := "" }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "system" }}{{ $system = $m.Content }}
{{- else if eq $m.Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ $m.Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

# Gemma 3 and 3n: the system prompt is folded into the first user turn by the template.
GEMMA3_TURNS = TurnFormat(
    name="gemma3",
    start_of_turn="<start_of_turn>",
    end_of_turn="<end_of_turn>",
    template_file="gemma3_chat_template.jinja",
    control=("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"),
    media=(
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
        "<start_of_audio>",
        "<end_of_audio>",
        "<audio_soft_token>",
    ),
    ollama_template=_OLLAMA_GEMMA3_TEMPLATE,
)
# Gemma 4's chat template (data/gemma4_chat_template.jinja) in Ollama's Go-template syntax, for plain chat with
# thinking off and no tools: every message is its own turn (the system one too); an unfinished last model turn is
# left open.
_OLLAMA_GEMMA4_TEMPLATE = """{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "system" }}<|turn>system
{{ $m.Content }}<turn|>
{{ else if eq $m.Role "user" }}<|turn>user
{{ $m.Content }}<turn|>
{{ if $last }}<|turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<|turn>model
{{ $m.Content }}{{ if not $last }}<turn|>
{{ end }}
{{- end }}
{{- end }}"""
# Gemma 4: a native system turn, a thinking channel switched on by <|think|>, tool calls. The template is TRL 1.16's
# gemma4_v5.jinja, the newest revision google/gemma-4-E2B-it ships (commit 8995379); with thinking off it writes no
# <|channel> block for a plain reply.
GEMMA4_TURNS = TurnFormat(
    name="gemma4",
    start_of_turn="<|turn>",
    end_of_turn="<turn|>",
    template_file="gemma4_chat_template.jinja",
    control=(
        "<|turn>",
        "<turn|>",
        "<bos>",
        "<eos>",
        "<pad>",
        "<|think|>",
        "<|channel>",
        "<channel|>",
        "<|tool>",
        "<tool|>",
        "<|tool_call>",
        "<tool_call|>",
        "<|tool_response>",
        "<tool_response|>",
        '<|"|>',
    ),
    media=("<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"),
    ollama_template=_OLLAMA_GEMMA4_TEMPLATE,
)
TURN_FORMATS: dict[str, TurnFormat] = {turns.name: turns for turns in (GEMMA3_TURNS, GEMMA4_TURNS)}

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
    per_layer_embeddings: tuple[str, ...] = ()  # Gemma 3n/4's per-layer token tables (2.35 B parameters in E4B)
    needs_token_type_ids: bool = False  # forward takes token_type_ids to tell text (0) from image tokens
    turns: TurnFormat = GEMMA3_TURNS  # turn markers, control tokens and chat template
    # Mixture-of-experts checkpoints keep their experts as 3-D parameters (Gemma4TextExperts), which bitsandbytes
    # does not quantise and LoRA cannot adapt: a 4-bit load would be silently half-quantised, so it is refused.
    experts: tuple[str, ...] = ()
    # llama.cpp's name for the language model, for GGUF export (persian_qlora.export's entries); None where the
    # export is not offered (docs/export.md). Gemma 4's mixture of experts is refused by the export's own checks.
    gguf_architecture: str | None = None

    @property
    def multimodal(self) -> bool:
        return self.text_family is not None

    @property
    def never_quantised(self) -> tuple[str, ...]:
        """Module names bitsandbytes must skip: the LM head, AltUp, and every tower. transformers matches a skip name
        as a suffix or as a prefix of the full module name, and the towers sit under ``model.``."""
        return self.full_precision + tuple(f"model.{tower}" for tower in self.towers)

    @property
    def reserved(self) -> tuple[str, ...]:
        """Control tokens and media placeholders that must never appear in a message's text."""
        return self.turns.control + self.turns.media

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

    def expert_parameters(self, config: Any) -> int:
        """Parameters in the language model's mixture-of-experts weights (0 without experts): 3-D tensors that
        bitsandbytes leaves in 16 bits and LoRA cannot adapt."""
        text = config.get_text_config()
        if not self.experts or not getattr(text, "enable_moe_block", False):
            return 0
        return text.num_hidden_layers * text.num_experts * 3 * text.moe_intermediate_size * text.hidden_size

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
            gguf_architecture="gemma3n",
        ),
        GemmaFamily(
            model_type="gemma3n",
            causal_lm_class="Gemma3nForConditionalGeneration",
            text_family="gemma3n_text",
            text_weight_names=((r"^model\.language_model\.", "model."),),
            towers=("vision_tower", "audio_tower", "embed_vision", "embed_audio"),
            full_precision=("lm_head", *_ALTUP),
            per_layer_embeddings=("embed_tokens_per_layer",),
            gguf_architecture="gemma3n",
        ),
        # Gemma 4: E2B/E4B carry per-layer embeddings (the entry is harmless where a checkpoint has none, as the 31B);
        # the 26B-A4B keeps mixture-of-experts weights under ``experts``. The hub's layout is Gemma 3n's.
        GemmaFamily(
            model_type="gemma4_text",
            causal_lm_class="Gemma4ForCausalLM",
            per_layer_embeddings=("embed_tokens_per_layer",),
            turns=GEMMA4_TURNS,
            experts=("experts",),
            gguf_architecture="gemma4",
        ),
        GemmaFamily(
            model_type="gemma4",
            causal_lm_class="Gemma4ForConditionalGeneration",
            text_family="gemma4_text",
            text_weight_names=((r"^model\.language_model\.", "model."),),
            towers=("vision_tower", "audio_tower", "embed_vision", "embed_audio"),
            per_layer_embeddings=("embed_tokens_per_layer",),
            turns=GEMMA4_TURNS,
            experts=("experts",),
            gguf_architecture="gemma4",
        ),
    )
}

# Model types the installed transformers knows in the Gemma 4 generation that persian-qlora refuses, and why.
UNSUPPORTED: dict[str, str] = {
    "gemma4_unified": (
        "Gemma 4 Unified's language model is its own architecture (Gemma4UnifiedTextModel, model_type "
        "'gemma4_unified_text'), not Gemma 4's, and persian-qlora has no tested loading, masking or merge for it; "
        "fine-tune Gemma 4 E4B (google/gemma-4-E4B-it) or 31B instead"
    ),
    "gemma4_unified_text": (
        "Gemma 4 Unified's language model is not tested with persian-qlora (see 'gemma4_unified'); fine-tune Gemma 4 "
        "E4B or 31B instead"
    ),
    "gemma4_assistant": (
        "Gemma 4 assistant models are drafters for speculative decoding that read the target model's shared keys "
        "and values, not chat models; fine-tune the target (a 'gemma4' checkpoint) instead"
    ),
    "gemma4_unified_assistant": (
        "Gemma 4 Unified assistant models are drafters for speculative decoding, not chat models; fine-tune a "
        "'gemma4' checkpoint instead"
    ),
}


def family_of(config_or_model: Any) -> GemmaFamily:
    """The family of a config or a model (peft-wrapped too), by ``config.model_type``."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if model_type in UNSUPPORTED:
        raise PersianQLoRAError(f"model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    if family is None:
        raise PersianQLoRAError(
            f"model_type {model_type!r} is not a Gemma family persian-qlora knows ({', '.join(sorted(FAMILIES))}); "
            "fine-tune a Gemma 3, 3n or 4 checkpoint, or add the family to persian_qlora.families.FAMILIES"
        )
    return family


def never_quantised() -> list[str]:
    """Every family's unquantised module names: the skip list of a quantisation config made before the family is
    known (a name absent from the model changes nothing)."""
    return list(dict.fromkeys(name for family in FAMILIES.values() for name in family.never_quantised))


def reserved_tokens() -> tuple[str, ...]:
    """Every control token of every family: what no message text may contain, whichever model it will train."""
    return tuple(dict.fromkeys(token for family in FAMILIES.values() for token in family.reserved))


def never_generated_tokens() -> tuple[str, ...]:
    """Every turn format's never-trained tokens (padding, document markers, media placeholders)."""
    return tuple(dict.fromkeys(token for turns in TURN_FORMATS.values() for token in turns.never_generated))


def turn_format_of(tokenizer) -> TurnFormat:
    """The turn format a tokenizer writes: the one whose turn markers are single tokens of its vocabulary and, if
    several are, whose start marker its chat template writes."""
    vocab = tokenizer.get_vocab()
    known = [t for t in TURN_FORMATS.values() if t.start_of_turn in vocab and t.end_of_turn in vocab]
    template = getattr(tokenizer, "chat_template", None) or ""
    written = [t for t in known if t.start_of_turn in template]
    if len(written) == 1 or (len(known) == 1 and not written):
        return (written or known)[0]
    raise TemplateError(
        f"the tokenizer has the turn markers of {[t.name for t in known] or 'no Gemma generation'} and its chat "
        f"template writes those of {[t.name for t in written] or 'none'}; persian-qlora trains Gemma chat models and "
        "needs a Gemma tokenizer (or one built by persian_qlora.tiny.build_tiny_tokenizer)"
    )
