"""Tiny Gemma models and a Gemma-style tokenizer, built offline in seconds from the bundled corpus.

They serve the offline demo (:func:`build_tiny_persian_lm`), the ``tiny=True`` training preset and ``persian-qlora
prepare`` without a tokenizer, and tests: ``build_tiny_gemma(path)`` writes a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load with no hub.

Dimensions are multiples of 64 because bitsandbytes' CPU 4-bit kernel asserts on smaller inner dimensions in
no-grad mode, so the same tiny models serve QLoRA too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from persian_qlora.families import TURN_FORMATS

__all__ = [
    "DEMO_DIMS",
    "PERSIAN_LM_DIMS",
    "GEMMA4_SPECIAL_TOKENS",
    "GEMMA_SPECIAL_TOKENS",
    "TinyArch",
    "build_tiny_gemma",
    "build_tiny_persian_lm",
    "build_tiny_tokenizer",
]

TinyArch = Literal[
    "gemma3", "gemma3n", "gemma3-vision", "gemma3n-multimodal", "gemma4", "gemma4-moe", "gemma4-multimodal"
]

# Gemma's control tokens, in the order of their ids in our tiny vocabulary (ids differ from the real one's,
# which is why nothing in the library hard-codes ids: it looks them up by name).
GEMMA_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
# Gemma 4's: the document markers, then its turn, thinking, tool and media tokens (families.GEMMA4_TURNS).
GEMMA4_SPECIAL_TOKENS = GEMMA_SPECIAL_TOKENS[:5] + tuple(
    dict.fromkeys(
        t for t in TURN_FORMATS["gemma4"].control + TURN_FORMATS["gemma4"].media if t not in GEMMA_SPECIAL_TOKENS
    )
)
_SPECIAL_TOKENS = {"gemma3": GEMMA_SPECIAL_TOKENS, "gemma4": GEMMA4_SPECIAL_TOKENS}
_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def _training_texts() -> Iterable[str]:
    from persian_qlora.dataset import bundled_corpus_path

    # The train split only: the test split scores the demo, so nothing built for it may have seen that text.
    for line in bundled_corpus_path("train").read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"]:
            yield message["content"]
    # A little English and code so that English text does not fall back to bytes at every letter.
    yield "The quick brown fox jumps over the lazy dog. Python, Git, SQL, HTTP and JSON are everyday tools."
    yield "def main():\n    print('hello world')\n    return 0\n"


def build_tiny_tokenizer(
    vocab_size: int = 2048, save_dir: str | Path | None = None, *, turns: Literal["gemma3", "gemma4"] = "gemma3"
):
    """Train a Gemma-style byte-fallback BPE tokenizer on the bundled Persian corpus's train split.

    The result is a real ``GemmaTokenizer`` (the same normaliser, byte fallback and decoder as Gemma's), carrying
    the special tokens and the exact official chat template of ``turns``' generation (Gemma 3 and 3n, or Gemma 4),
    so any Persian or English text round-trips without ``<unk>``. Training is deterministic and takes about a second.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    special = _SPECIAL_TOKENS[turns]
    reserved = len(special) + len(_BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed {reserved}: the special and byte tokens take that many")
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Train on Gemma-style pieces (a word with its leading "▁", newline runs alone) so no merge crosses a word or
    # line boundary; GemmaTokenizer then applies the merges to whole segments, as SentencePiece does for Gemma.
    bpe.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|▁?[^▁\n]+|▁+"), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - reserved, show_progress=False, min_frequency=2)
    bpe.train_from_iterator((text.replace(" ", "▁") for text in _training_texts()), trainer)
    learned = json.loads(bpe.to_str())["model"]

    vocab = {token: i for i, token in enumerate(special + _BYTE_TOKENS)}
    for token in sorted(learned["vocab"], key=learned["vocab"].__getitem__):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=list(special[5:]),
        chat_template=TURN_FORMATS[turns].chat_template(),
        model_max_length=8192,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def _tiny_text_config(arch: TinyArch, vocab_size: int, tokenizer, overrides: dict) -> object:
    from transformers import Gemma3nTextConfig, Gemma3TextConfig

    from persian_qlora.families import turn_format_of

    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids(turn_format_of(tokenizer).end_of_turn),
        ],
    }
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=8192,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=64,
        **ids,
    )
    if arch.startswith("gemma3n"):
        layers = overrides.get("num_hidden_layers", common["num_hidden_layers"])
        extra = dict(
            vocab_size_per_layer_input=vocab_size,
            hidden_size_per_layer_input=64,
            altup_num_inputs=2,
            laurel_rank=64,
            num_kv_shared_layers=0,
            activation_sparsity_pattern=[0.0] * layers,
        )
        return Gemma3nTextConfig(**{**common, **extra, **overrides})
    if arch.startswith("gemma4"):
        return _tiny_gemma4_text_config(arch, common, overrides)
    return Gemma3TextConfig(**{**common, "query_pre_attn_scalar": 32, **overrides})


def _tiny_gemma4_text_config(arch: TinyArch, common: dict, overrides: dict):
    """Gemma 4's language model at toy size with its real structure: sliding and full layers with their own head
    sizes (full layers use ``global_head_dim`` and proportional RoPE), the last two layers reusing the keys and values
    of the last sliding and full layers before them (``num_kv_shared_layers``), per-layer embeddings, a final-logit
    soft-cap of 30. ``"gemma4-moe"`` is the 26B-A4B's structure instead: a mixture of experts beside each layer's
    dense MLP, no per-layer embeddings, no KV sharing."""
    from transformers import Gemma4TextConfig

    layers = overrides.get("num_hidden_layers", 4)
    gemma4 = dict(
        num_hidden_layers=layers,
        layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
        global_head_dim=64,
        final_logit_softcapping=30.0,
    )
    if arch == "gemma4-moe":
        extra = dict(
            hidden_size_per_layer_input=0,
            num_kv_shared_layers=0,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=64,
        )
    else:
        extra = dict(
            hidden_size_per_layer_input=64,
            vocab_size_per_layer_input=common["vocab_size"],
            num_kv_shared_layers=2,
        )
    return Gemma4TextConfig(**{**common, **gemma4, **extra, **overrides})


def _tiny_gemma4_multimodal_config(text_config, tokenizer):
    """Gemma 4's whole layout at toy size: its native vision tower (no timm) and audio Conformer, one layer each, and
    both multimodal embedders; media token ids are the tokenizer's Gemma 4 placeholders."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    vision = Gemma4VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        patch_size=4,
        position_embedding_size=64,
    )
    audio = Gemma4AudioConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[8, 4],
        output_proj_dims=64,
    )
    token = tokenizer.convert_tokens_to_ids
    return Gemma4Config(
        text_config=text_config,
        vision_config=vision,
        audio_config=audio,
        boi_token_id=token("<|image>"),
        eoi_token_id=token("<image|>"),
        image_token_id=token("<|image|>"),
        video_token_id=token("<|video|>"),
        boa_token_id=token("<|audio>"),
        eoa_token_index=token("<audio|>"),
        audio_token_id=token("<|audio|>"),
    )


def _tiny_gemma3n_multimodal_config(text_config, tokenizer):
    """Gemma 3n's whole layout at toy size: the MobileNetV5 vision tower (timm) at 1/16 of its channels, a one-layer
    Conformer audio tower, and both multimodal embedders. As in the real model, media token ids follow the text
    vocabulary (the tiny tokenizer has no audio tokens; text never contains them)."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nVisionConfig

    vocab = text_config.vocab_size
    vision = Gemma3nVisionConfig(model_args={"channel_multiplier": 0.0625}, vocab_offset=vocab)
    audio = Gemma3nAudioConfig(
        hidden_size=64,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=1,
        sscp_conv_channel_size=(16, 8),
        input_feat_size=32,
        vocab_offset=vocab + vision.vocab_size,
    )
    return Gemma3nConfig(
        text_config=text_config,
        vision_config=vision,
        audio_config=audio,
        boi_token_id=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_id=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        boa_token_id=vocab + vision.vocab_size,
        eoa_token_id=vocab + vision.vocab_size + audio.vocab_size,
        audio_token_id=vocab + vision.vocab_size + audio.vocab_size + 1,
    )


def _tiny_config(arch: TinyArch, vocab_size: int, tokenizer, overrides: dict):
    text_config = _tiny_text_config(arch, vocab_size, tokenizer, overrides)
    if arch == "gemma3n-multimodal":
        return _tiny_gemma3n_multimodal_config(text_config, tokenizer)
    if arch == "gemma4-multimodal":
        return _tiny_gemma4_multimodal_config(text_config, tokenizer)
    if arch != "gemma3-vision":
        return text_config
    from transformers import Gemma3Config, SiglipVisionConfig

    vision_config = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=text_config.eos_token_id,
    )


_TINY_CLASSES = {
    "gemma3": "Gemma3ForCausalLM",
    "gemma3n": "Gemma3nForCausalLM",
    "gemma3-vision": "Gemma3ForConditionalGeneration",
    "gemma3n-multimodal": "Gemma3nForConditionalGeneration",
    "gemma4": "Gemma4ForCausalLM",
    "gemma4-moe": "Gemma4ForCausalLM",
    "gemma4-multimodal": "Gemma4ForConditionalGeneration",
}


def build_tiny_gemma(
    save_dir: str | Path,
    arch: TinyArch = "gemma3",
    *,
    seed: int = 0,
    vocab_size: int = 2048,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "2GB",
    **config_overrides: Any,
) -> Path:
    """Write a tiny random Gemma (model, tokenizer, generation config) to ``save_dir`` and return the path.

    ``arch`` picks ``Gemma3ForCausalLM`` ("gemma3"), ``Gemma3nForCausalLM`` ("gemma3n"), the multimodal
    ``Gemma3ForConditionalGeneration`` with a small SigLIP vision tower ("gemma3-vision"), or the whole
    ``Gemma3nForConditionalGeneration`` with vision (timm) and audio towers ("gemma3n-multimodal": building it
    needs timm, ``pip install 'persian-qlora[multimodal]'``). ``"gemma4"`` is ``Gemma4ForCausalLM`` with KV sharing and
    per-layer embeddings, ``"gemma4-moe"`` the same class with a mixture of experts, ``"gemma4-multimodal"`` the whole
    ``Gemma4ForConditionalGeneration`` with its native vision and audio towers; all three get a Gemma 4 tokenizer
    and chat template. Weights depend only on ``seed``; the generation config stops on both ``<eos>`` and the turn
    end (``<end_of_turn>``, Gemma 4's ``<turn|>``), as Gemma's does.
    ``vocab_size`` is the model's vocabulary rows. The tokenizer learns that many tokens where the bundled corpus
    allows (at most 7,688, from the train split); rows beyond its tokens are never produced by it, as Gemma's unused
    rows are not
    (``vocab_size=262_144`` gives Gemma's LM-head width). Below about 420 the tokenizer needs more tokens than
    asked for (its alphabet), and the model gets a row for each.
    ``config_overrides`` replace text-config fields (e.g. ``hidden_size=128, num_hidden_layers=4``); keep
    dimensions multiples of 64 for 4-bit on CPU.
    """
    import transformers

    class_name = _TINY_CLASSES.get(arch)
    if class_name is None:
        raise ValueError(f"unknown tiny Gemma arch {arch!r}; choose one of {', '.join(map(repr, _TINY_CLASSES))}")
    model_class = getattr(transformers, class_name)
    save_dir = Path(save_dir)
    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, turns="gemma4" if arch.startswith("gemma4") else "gemma3")
    config = _tiny_config(arch, max(vocab_size, len(tokenizer)), tokenizer, config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(dtype)
    eos = config.get_text_config().eos_token_id
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(save_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(save_dir)
    return save_dir


# A small tiny Gemma 3 (0.8M parameters), e.g. for inference benchmarks.
DEMO_DIMS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
}
# The offline demo's base (2.8M parameters). Chosen on a validation slice of the train split (docs/comparison.md):
# at hidden 128, eight passes over the train split's text left a training perplexity of 245 and fine-tuned
# replies that looped on one word; at hidden 256 the same passes reach 51, and fine-tuned replies end their turn.
PERSIAN_LM_DIMS: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 64,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
}


def build_tiny_persian_lm(
    save_dir: str | Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    block_size: int = 128,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    roles: tuple[str, ...] = ("system", "user", "assistant"),
    data: str | Path | None = None,
    dims: dict[str, Any] | None = None,
) -> Path:
    """A tiny Gemma 3 pretrained on plain Persian text from the bundled *train* split, for the offline demo.

    LoRA cannot teach a random model anything useful: its frozen random embeddings cap how confident the output
    can be, so greedy decoding repeats the most frequent token. Like a real base model, this one first learns the
    language, from the plain text (no chat template, ``<eos>`` between texts) of the ``roles`` turns of ``data``
    (a chat JSONL; by default the bundled train split, every turn), so that a QLoRA/LoRA fine-tune has something
    to adapt and something new to learn: the turn format and when to end a turn. The test split is never seen.
    ``dims`` are :func:`build_tiny_gemma` overrides (default :data:`PERSIAN_LM_DIMS`). Deterministic for a seed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persian_qlora.dataset import bundled_corpus_path

    path = build_tiny_gemma(save_dir, "gemma3", seed=seed, **(PERSIAN_LM_DIMS if dims is None else dims))
    tokenizer = AutoTokenizer.from_pretrained(path)
    source = Path(data) if data is not None else bundled_corpus_path("train")
    texts = [
        m["content"]
        for line in source.read_text(encoding="utf-8").splitlines()
        for m in json.loads(line)["messages"]
        if m["role"] in roles
    ]
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in [*ids, tokenizer.eos_token_id]]
    blocks = torch.tensor(stream[: len(stream) // block_size * block_size]).view(-1, block_size)

    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    steps = epochs * -(-len(blocks) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for batch in blocks[torch.randperm(len(blocks), generator=generator)].split(batch_size):
                model(input_ids=batch, labels=batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
    model.save_pretrained(path)
    return path
