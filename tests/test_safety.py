"""Safe defaults: no pickles unless asked, no remote code, no secrets in anything written."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from persian_qlora import PersianQLoRAError, load_for_inference, merge_to_fp16
from persian_qlora.modeling import build_lora_model

FAKE_TOKEN = "hf_FAKEsecretTOKEN0123456789abcdefXYZ"


@pytest.fixture
def pickled_model(tiny_gemma3_path, tmp_path):
    """The tiny model stored the old way: pytorch_model.bin (a pickle) and no safetensors."""
    path = tmp_path / "pickled"
    shutil.copytree(tiny_gemma3_path, path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_pickled_weights_are_refused_unless_the_user_opts_in(pickled_model):
    with pytest.raises(OSError, match="safetensors"):
        load_for_inference(pickled_model)
    with pytest.raises(OSError, match="safetensors"):
        build_lora_model(pickled_model)
    model, _ = load_for_inference(pickled_model, allow_pickle=True)
    assert model is not None


def test_a_pickled_adapter_is_refused_unless_the_user_opts_in(tiny_gemma3_path, tmp_path):
    adapter = tmp_path / "adapter"
    build_lora_model(tiny_gemma3_path).save_pretrained(adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PersianQLoRAError, match="pickled adapter_model.bin"):
        load_for_inference(tiny_gemma3_path, adapter)
    with pytest.raises(PersianQLoRAError, match="pickled adapter_model.bin"):
        merge_to_fp16(tiny_gemma3_path, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    merge_to_fp16(tiny_gemma3_path, adapter, tmp_path / "merged", allow_pickle=True)


def test_remote_code_is_never_trusted(tiny_gemma3_path, tmp_path):
    """A checkpoint that asks for its own Python code is refused, not executed."""
    path = tmp_path / "remote"
    shutil.copytree(tiny_gemma3_path, path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    model, _ = load_for_inference(path)  # the module would raise SystemExit if it were imported
    assert type(model).__name__ == "Gemma3ForCausalLM"


def test_no_token_is_written_to_any_output(tmp_path):
    """Train, merge and report with a hub token in the environment: it appears in no file written."""
    env = {"HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "PATH": "/usr/bin:/bin"}
    run = tmp_path / "run"
    commands = [
        ["train", "--tiny", "--output-dir", str(run), "--max_steps", "2", "--save_steps", "1"],
        ["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")],
    ]
    for args in commands:
        result = subprocess.run([sys.executable, "-m", "persian_qlora.cli", *args], env=env, capture_output=True)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert FAKE_TOKEN.encode() not in result.stdout + result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 20
    for path in written:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
