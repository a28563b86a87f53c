"""The test kit: tiny Gemma checkpoints in the hub's layouts, and benchmark data of a chosen length distribution.

Downstream projects use these for their own tests; the pytest fixtures live in :mod:`persian_qlora.pytest_plugin`.
The tiny models and tokenizer themselves are in :mod:`persian_qlora.tiny` (the offline demo uses them too) and are
re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from persian_qlora.chat_template import gemma3_chat_template
from persian_qlora.tiny import (
    DEMO_DIMS,
    GEMMA_SPECIAL_TOKENS,
    TinyArch,
    build_tiny_gemma,
    build_tiny_persian_lm,
    build_tiny_tokenizer,
)

__all__ = [
    "DEMO_DIMS",
    "GEMMA_SPECIAL_TOKENS",
    "TinyArch",
    "build_tiny_gemma",
    "build_tiny_gemma3n_e4b",
    "build_tiny_persian_lm",
    "build_hub_checkpoint",
    "build_tiny_tokenizer",
    "chained_conversations",
    "complete_merges",
    "gemma3_chat_template",
    "lognormal_lengths",
    "plant_turn_end_copies",
]


def complete_merges(save_dir: str | Path, vocabulary_size: int | None = None) -> Path:
    """Give the tokenizer saved in ``save_dir`` every merge its vocabulary implies, ranked in piece order, as a
    tokenizer converted from SentencePiece (Gemma's) has; the GGUF export needs that form (llama.cpp re-derives the
    merges from the pieces). The tiny tokenizer, trained with tokenizers' BpeTrainer, keeps only the merges it
    learned, so llama.cpp would split some words differently, and the export refuses it as built.

    ``vocabulary_size`` first grows the vocabulary to that many tokens with pieces joined from two of its pieces
    (within a word): a tokenizer as large as Gemma's (262,144), for benchmarks that must write a real-size
    embedding.
    """
    path = Path(save_dir) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    added = {token["content"] for token in data["added_tokens"]}
    normal = [p for p in sorted(vocab, key=vocab.__getitem__) if p not in added and not p.startswith("<0x")]
    if vocabulary_size is not None:
        size, next_id = len(set(vocab) | added), max(vocab.values()) + 1
        # Within a word, as SentencePiece's pieces are: never across a newline or before a word's leading "▁".
        inner = [piece for piece in normal if "\n" not in piece]
        joined = (left + right for left in inner for right in inner if not right.startswith("▁"))
        while size < vocabulary_size:
            piece = next(joined)
            if piece not in vocab:
                vocab[piece], next_id, size = next_id, next_id + 1, size + 1
    pieces = set(vocab) - added
    data["model"]["merges"] = [
        [piece[:cut], piece[cut:]]
        for piece in sorted(pieces, key=vocab.__getitem__)
        for cut in range(1, len(piece))
        if piece[:cut] in pieces and piece[cut:] in pieces
    ]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return Path(save_dir)


def build_hub_checkpoint(
    save_dir: str | Path, arch: Literal["gemma3-vision", "gemma3n-multimodal", "gemma4-multimodal"], *, seed: int = 0
) -> Path:
    """A tiny multimodal Gemma laid out exactly as its real checkpoints are served on the hub.

    Sharded safetensors with ``model.safetensors.index.json``, the processor and preprocessor configs, and the
    tensor names of the real files: ``google/gemma-3-4b-it`` names its language model ``language_model.model.*``
    and its SigLIP tower ``vision_tower.vision_model.*``; ``google/gemma-3n-E4B-it`` uses ``model.language_model.*``,
    ``model.vision_tower.*`` (timm), ``model.audio_tower.*``, ``model.embed_vision.*`` and ``model.embed_audio.*``;
    ``google/gemma-4-E2B-it`` has Gemma 3n's layout with Gemma 4's native towers (``"gemma4-multimodal"``: KV sharing,
    per-layer embeddings, vision and audio towers whose linears are ``Gemma4ClippableLinear``).
    ``"gemma3n-multimodal"`` needs timm to build.
    """
    from safetensors.torch import load_file, save_file

    shard = "10MB" if arch == "gemma3n-multimodal" else "1MB"  # a few shards each, as on the hub
    save_dir = build_tiny_gemma(save_dir, arch, seed=seed, max_shard_size=shard)
    index_path = save_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if arch == "gemma3-vision":  # transformers writes this tower's names one level shorter than the hub file has
        rename = {k: f"vision_tower.vision_model.{k.removeprefix('vision_tower.')}" for k in index["weight_map"]}
        rename = {k: v for k, v in rename.items() if k.startswith("vision_tower.")}
        for shard in sorted(set(index["weight_map"].values())):
            tensors = load_file(save_dir / shard)
            save_file({rename.get(k, k): v for k, v in tensors.items()}, save_dir / shard, metadata={"format": "pt"})
        index["weight_map"] = {rename.get(k, k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    _write_processor_configs(save_dir, arch)
    return save_dir


def _write_processor_configs(save_dir: Path, arch: str) -> None:
    """``preprocessor_config.json`` and ``processor_config.json`` as the real checkpoints carry them, made by the
    real processor classes (for Gemma 3n the image processor's and the audio feature extractor's settings share one
    file). The tiny tokenizer has no audio tokens, so no processor object is built from it."""
    from transformers import Gemma3ImageProcessor, Gemma3nAudioFeatureExtractor, SiglipImageProcessor

    if arch == "gemma3-vision":
        preprocessor = Gemma3ImageProcessor(size={"height": 32, "width": 32}).to_dict()
        processor = {"image_seq_length": 4, "processor_class": "Gemma3Processor"}
    elif arch == "gemma4-multimodal":
        from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor

        preprocessor = {**Gemma4AudioFeatureExtractor().to_dict(), **Gemma4ImageProcessor(patch_size=4).to_dict()}
        processor = {"audio_ms_per_token": 40, "image_seq_length": 16, "processor_class": "Gemma4Processor"}
    else:
        preprocessor = {
            **Gemma3nAudioFeatureExtractor(feature_size=32).to_dict(),
            **SiglipImageProcessor(size={"height": 32, "width": 32}).to_dict(),
        }
        processor = {"audio_seq_length": 188, "image_seq_length": 256, "processor_class": "Gemma3nProcessor"}
    preprocessor["processor_class"] = processor["processor_class"]
    for name, content in (("preprocessor_config.json", preprocessor), ("processor_config.json", processor)):
        (save_dir / name).write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")


# Gemma 3n's norms on a sub-layer's output, before it joins the residual stream.
_POST_NORMS = (
    "post_attention_layernorm.weight",
    "post_feedforward_layernorm.weight",
    "post_per_layer_input_norm.weight",
    "post_laurel_norm.weight",
)


def build_tiny_gemma3n_e4b(save_dir: str | Path, *, seed: int = 0, vocab_size: int = 512) -> Path:
    """A tiny text Gemma 3n with E4B's layer structure, in bf16, whose tokenizer the GGUF export takes.

    llama.cpp fixes Gemma 3n's structure rather than reading it (see ``persian_qlora._gguf_gemma3n``), so a tiny 3n
    it runs as transformers does keeps E4B's: 35 layers whose ``layer_types`` are E4B's (every 5th global), KV
    sharing from layer 20, activation sparsity in the first 10 layers, AltUp with 4 inputs, a LAuReL rank of 64 and
    a per-layer width of 256. The widths are tiny (hidden 64, feed-forward 1024) and the vocabulary small: the
    per-layer table is tokens x 35 x 256. Its last 32 tokens are past the per-layer table
    (``vocab_size_per_layer_input``), as E4B's media tokens are, so they read its row 0, and row 0 (the padding
    row, zero as initialised) is made random so that a wrong row there shows. AltUp's ``correct_output_scale``,
    zero as initialised (so the per-layer inputs would change nothing), is set to ones. ``complete_merges`` is
    applied.

    Two initial weights make a random 35-layer 3n chaotic, its logits no stable function of its weights, so that no
    file could be held to them (its own bf16 run differs from its fp32 run by more than its largest logit): Gemma 3n
    attends without a query scale (its trained query norm carries it), so the query norms are set to
    1/sqrt(head_dim), the scale Gemma 3 applies; and every sub-layer's output norm (after attention, feed-forward,
    LAuReL and the per-layer input) is set to 0.1 instead of 1, so that a layer adds a small update to the residual
    stream: 0.3 % noise on every weight then moves the logits by 0.5 % of the largest instead of 10 % (measured).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3nTextConfig

    e4b = Gemma3nTextConfig()  # transformers' defaults are google/gemma-3n-E4B-it's language model
    layout = {
        "num_hidden_layers": e4b.num_hidden_layers,
        "layer_types": e4b.layer_types,
        "num_kv_shared_layers": e4b.num_kv_shared_layers,
        "activation_sparsity_pattern": e4b.activation_sparsity_pattern,
        "altup_num_inputs": e4b.altup_num_inputs,
        "laurel_rank": e4b.laurel_rank,
        "hidden_size_per_layer_input": e4b.hidden_size_per_layer_input,
        "intermediate_size": 1024,
        "vocab_size_per_layer_input": vocab_size - 32,
    }
    path = build_tiny_gemma(save_dir, "gemma3n", seed=seed, vocab_size=vocab_size, dtype=torch.bfloat16, **layout)
    weights = load_file(path / "model.safetensors")
    table = weights["model.embed_tokens_per_layer.weight"]
    row = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(seed)) * table.float().std()
    table[0] = row.to(table.dtype)
    head_dim = json.loads((path / "config.json").read_text(encoding="utf-8"))["head_dim"]
    for name, weight in weights.items():
        if name.endswith("self_attn.q_norm.weight"):
            weight.fill_(head_dim**-0.5)
        elif name.endswith(_POST_NORMS):
            weight.fill_(0.1)
        elif name.endswith("altup.correct_output_scale"):
            weight.fill_(1.0)  # zero as initialised, which cuts the per-layer inputs off from the model
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return complete_merges(path)


def plant_turn_end_copies(model_dir: str | Path, rows: Sequence[int] = range(1500, 1600), *, seed: int = 0) -> Path:
    """Make a tiny checkpoint's ``<end_of_turn>`` row not distinct, as a pretrained (not instruction-tuned) Gemma's is.

    ``rows`` of the embedding (tied to the head) become near-copies of that row (noise of 0.4 its norm: cosine
    about 0.93 at any width), as Gemma 3 270M's 6,242 ``<unused*>`` rows sit around it, so
    :func:`~persian_qlora.tokens.indistinct_tokens` finds it and the defaults train it (``train_turn_end``). The
    default rows are ordinary tokens no reply in the bundled corpus ends with.
    Rewrites ``model.safetensors`` in place and returns ``model_dir``.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from persian_qlora.families import turn_format_of

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    turn_end = tokenizer.convert_tokens_to_ids(turn_format_of(tokenizer).end_of_turn)
    weights = load_file(model_dir / "model.safetensors")
    name = next(key for key in weights if key.endswith("embed_tokens.weight"))
    table = weights[name]
    rows = torch.tensor(list(rows))
    noise = torch.randn(len(rows), table.shape[1], generator=torch.Generator().manual_seed(seed))
    table[rows] = table[turn_end] + noise / noise.norm(dim=1, keepdim=True) * table[turn_end].norm() * 0.4
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def lognormal_lengths(count: int, mean: float = 310.0, sigma: float = 1.0, cap: int = 4000) -> list[int]:
    """``count`` conversation lengths spread as a log-normal of this mean (persian-gk's is about 310 tokens).

    Evenly spaced quantiles rather than random draws: deterministic, and the long tail is always there.
    """
    import math
    from statistics import NormalDist

    mu = math.log(mean) - sigma**2 / 2
    quantiles = (NormalDist(mu, sigma).inv_cdf((i + 0.5) / count) for i in range(count))
    return [min(cap, max(32, round(math.exp(q)))) for q in quantiles]


def chained_conversations(tokenizer, lengths: Iterable[int], *, seed: int = 0) -> list[dict[str, Any]]:
    """Multi-turn ``{"messages": ...}`` records of about the given token lengths, for benchmarks.

    Each chains random (user, model) exchanges from the bundled train split for as long as one more brings it
    closer to its length; lengths are shuffled with ``seed``.
    """
    import random

    from persian_qlora.dataset import PersianChatDataset

    exchanges = [
        conversation[i : i + 2]
        for conversation in PersianChatDataset.bundled(tokenizer).conversations
        for i in range(len(conversation) - 1)
        if conversation[i]["role"] == "user" and conversation[i + 1]["role"] == "assistant"
    ]
    rng = random.Random(seed)
    lengths = list(lengths)
    rng.shuffle(lengths)
    records = []
    for target in lengths:
        messages: list[dict[str, str]] = []
        length = 1  # <bos>
        while True:
            exchange = rng.choice(exchanges)
            added = len(tokenizer.apply_chat_template(exchange, tokenize=True, return_dict=False)) - 1
            if messages and abs(length + added - target) >= abs(length - target):
                break
            messages += exchange
            length += added
        records.append({"messages": messages})
    return records
