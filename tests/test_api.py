import importlib
import re
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest

import persian_qlora
from persian_qlora._deprecation import renamed_arguments

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_public_api_resolves_and_version_is_single_sourced():
    for name in persian_qlora.__all__:
        assert getattr(persian_qlora, name) is not None, name
    assert persian_qlora.__version__ == version("persian-qlora")


def test_api_md_is_true_about_what_the_top_level_exports():
    text = API_MD.read_text(encoding="utf-8")
    top, _, by_module = text.partition("## Importable from their modules")
    entry = r"^::: persian_qlora\.([\w.]+)\.(\w+)$"
    documented = re.findall(entry, top, re.M)
    # Modules first: importing persian_qlora.compare must not turn `from persian_qlora import compare` into a module.
    modules = {module: importlib.import_module(f"persian_qlora.{module}") for module, _ in documented}
    for module, name in documented:  # what it says is importable from the top level is, and is the same object
        assert name in persian_qlora.__all__, f"api.md lists {name} as top-level; it is not in __all__"
        assert getattr(persian_qlora, name) is getattr(modules[module], name), name
    missing = set(persian_qlora.__all__) - {"__version__"} - {name for _, name in documented}
    assert not missing, f"in __all__ but not in api.md's top-level sections: {sorted(missing)}"
    for module, name in re.findall(entry, by_module, re.M):
        assert hasattr(importlib.import_module(f"persian_qlora.{module}"), name), f"persian_qlora.{module}.{name}"


def test_a_renamed_argument_keeps_its_old_name_for_a_release_with_a_future_warning():
    @renamed_arguments(old="new")
    def f(*, new):
        return new

    with pytest.warns(FutureWarning, match=r"f\(\): old= is deprecated .* use new="):
        assert f(old=1) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(new=2) == 2
    with pytest.raises(TypeError, match="both old= .* and new="):
        f(old=1, new=2)


def _old_name_warns(old: str):
    return pytest.warns(FutureWarning, match=rf"{old}= is deprecated and will be removed after persian-qlora")


def test_old_normaliser_names_still_work_and_warn():
    from persian_qlora import NormalizerConfig, clean_conversation, normalize_persian

    digits = NormalizerConfig(digits="fa")
    with _old_name_warns("config"):
        assert (
            normalize_persian("كتاب 12", config=digits) == normalize_persian("كتاب 12", normalize=digits) == "کتاب ۱۲"
        )
    record = {"messages": [{"role": "user", "content": "كتاب"}, {"role": "assistant", "content": "ي"}]}
    with _old_name_warns("normalizer"):
        kept = clean_conversation(record, normalizer=None)
    assert kept == clean_conversation(record, normalize=None) and kept[0]["content"] == "كتاب"


def test_old_model_and_quantisation_names_still_work_and_warn(tiny_gemma3_path, tmp_path):
    import bitsandbytes as bnb

    from persian_qlora import build_lora_model, export_gguf, gguf_base, load_for_inference
    from persian_qlora.loading import load_base

    with _old_name_warns("path_or_id"), _old_name_warns("quantization"):
        model, _ = load_for_inference(path_or_id=tiny_gemma3_path, quantization="4bit")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    with _old_name_warns("model_id_or_path"):
        assert build_lora_model(model_id_or_path=tiny_gemma3_path).base_loading.base == str(tiny_gemma3_path)
    with _old_name_warns("model_id_or_path"):
        assert load_base(model_id_or_path=tiny_gemma3_path)[1].base == str(tiny_gemma3_path)
    missing = tmp_path / "missing"
    with _old_name_warns("merged_dir"), pytest.raises(FileNotFoundError, match="no checkpoint directory at .*missing"):
        export_gguf(merged_dir=missing, output_file=tmp_path / "x.gguf")
    with _old_name_warns("model_id_or_path"), pytest.raises(OSError, match=f"{tmp_path} .* a file named nope.gguf"):
        gguf_base(model_id_or_path=tmp_path, gguf_file="nope.gguf")
