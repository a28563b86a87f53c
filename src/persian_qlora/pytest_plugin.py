"""Pytest fixtures with tiny random Gemma models, for persian-qlora's tests and for downstream projects.

Enable them in a ``conftest.py`` with ``pytest_plugins = ["persian_qlora.pytest_plugin"]``. Every fixture is
session-scoped and built offline in seconds under pytest's temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from persian_qlora.testing import build_hub_checkpoint, build_tiny_gemma, build_tiny_tokenizer

# Building the tiny Gemma 3n multimodal checkpoint needs timm (its vision tower), which the default install leaves
# out: tests that use it carry this marker, and `make test-multimodal` runs them in a venv with timm.
multimodal = pytest.mark.multimodal

# Every tiny layout a family-aware feature should be tested on, as (fixture name, text_only): text-only Gemma 3, 3n
# and 4, and the multimodal hub layouts loaded as their language model alone (True) or whole (False).
TINY_LAYOUTS = [
    pytest.param("tiny_gemma3_path", True, id="gemma3"),
    pytest.param("tiny_gemma3n_path", True, id="gemma3n"),
    pytest.param("tiny_gemma3_vision_hub_path", True, id="gemma3-vision"),
    pytest.param("tiny_gemma3_vision_hub_path", False, id="gemma3-vision-whole"),
    pytest.param("tiny_gemma3n_multimodal_hub_path", True, id="gemma3n-mm", marks=multimodal),
    pytest.param("tiny_gemma3n_multimodal_hub_path", False, id="gemma3n-mm-whole", marks=multimodal),
    pytest.param("tiny_gemma4_path", True, id="gemma4"),
    pytest.param("tiny_gemma4_multimodal_hub_path", True, id="gemma4-mm"),
    pytest.param("tiny_gemma4_multimodal_hub_path", False, id="gemma4-mm-whole"),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "multimodal: needs the tiny Gemma 3n multimodal checkpoint, whose vision tower needs timm"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A Gemma-style tokenizer (Gemma special tokens, byte fallback, Gemma 3 chat template)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random ``Gemma3ForCausalLM`` with its tokenizer."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def tiny_gemma3n_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random ``Gemma3nForCausalLM`` with its tokenizer."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma3n"), "gemma3n")


@pytest.fixture(scope="session")
def tiny_gemma3_vision_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random multimodal ``Gemma3ForConditionalGeneration`` (SigLIP vision tower)."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma3-vision"), "gemma3-vision")


@pytest.fixture(scope="session")
def tiny_gemma3_vision_hub_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``Gemma3ForConditionalGeneration`` in ``google/gemma-3-4b-it``'s layout: sharded, with an index, the
    processor configs and the hub's tensor names."""
    return build_hub_checkpoint(tmp_path_factory.mktemp("tiny-gemma3-vision-hub"), "gemma3-vision")


@pytest.fixture(scope="session")
def tiny_gemma3n_multimodal_hub_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny whole ``Gemma3nForConditionalGeneration`` (timm vision tower, audio tower) in
    ``google/gemma-3n-E4B-it``'s layout. Building it needs timm; mark tests that use it ``multimodal``."""
    pytest.importorskip(
        "timm", reason="the Gemma 3n vision tower is a timm model: pip install 'persian-qlora[multimodal]'"
    )
    return build_hub_checkpoint(tmp_path_factory.mktemp("tiny-gemma3n-multimodal-hub"), "gemma3n-multimodal")


@pytest.fixture(scope="session")
def tiny_gemma4_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random ``Gemma4ForCausalLM`` (KV sharing, per-layer embeddings) with a Gemma 4
    tokenizer and chat template."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma4"), "gemma4")


@pytest.fixture(scope="session")
def tiny_gemma4_moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random mixture-of-experts ``Gemma4ForCausalLM`` (the 26B-A4B's structure)."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma4-moe"), "gemma4-moe")


@pytest.fixture(scope="session")
def tiny_gemma4_multimodal_hub_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny whole ``Gemma4ForConditionalGeneration`` (native vision and audio towers) in
    ``google/gemma-4-E2B-it``'s layout."""
    return build_hub_checkpoint(tmp_path_factory.mktemp("tiny-gemma4-multimodal-hub"), "gemma4-multimodal")
