"""The test kit: tiny Gemma checkpoints in the hub's layouts, and benchmark data of a chosen length distribution.

Downstream projects use these for their own tests; the pytest fixtures live in :mod:`persian_qlora.pytest_plugin`.
The tiny models and tokenizer themselves are in :mod:`persian_qlora.tiny` (the offline demo uses them too) and are
re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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
    "build_tiny_persian_lm",
    "build_hub_checkpoint",
    "build_tiny_tokenizer",
    "chained_conversations",
    "gemma3_chat_template",
    "lognormal_lengths",
]


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
