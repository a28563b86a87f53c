"""The examples run, offline, against the public API (they are the first code a user copies)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(tmp_path, *args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_prepare_data_example(tmp_path):
    out = _run(tmp_path, "prepare_data.py")
    assert "conversations kept" in out and "first example's trained tokens" in out


def test_train_and_merge_examples(tmp_path):
    assert "adapter saved to runs/qlora" in _run(tmp_path, "train_qlora.py", "--tiny")
    assert "runs/lora" in _run(tmp_path, "train_lora.py", "--tiny")
    for adapter, base in (("runs/qlora", "nf4"), ("runs/lora", "original")):
        out = _run(tmp_path, "merge.py", adapter, f"merged/{base}", "--merge-base", base)
        assert "max |logit difference|" in out
        assert (tmp_path / "merged" / base / "README.md").exists()


def test_chat_example(tmp_path, tiny_gemma3_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "chat.py"), str(tiny_gemma3_path)],
        input="سلام\n/reset\nحالت چطوره؟\n/exit\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("شما> ") == 4
