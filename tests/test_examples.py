"""The examples run, offline, against the public API (they are the first code a user copies)."""

import os
import re
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


def test_chat_example_reads_to_end_of_input_skipping_empty_lines_in_utf8_on_any_locale(tmp_path, tiny_gemma3_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "chat.py"), str(tiny_gemma3_path), "--max-new-tokens", "6"],
        input="سلام\n\n   \n/reset\nحالت چطوره؟\n".encode(),  # no /exit: the input just ends
        capture_output=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},  # a locale that cannot print Persian
    )
    stdout, stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stdout.count("مدل> ") == 2  # one reply per non-empty turn
    assert "(conversation cleared)" in stdout


def test_compare_example_uses_the_public_api_and_writes_a_report(tmp_path, tiny_gemma3_path):
    from persian_qlora import bundled_corpus_path

    data = ("--data", str(bundled_corpus_path("train")), "--test-data", str(bundled_corpus_path("test")))
    smoke = ("--max-steps", "1", "--max-eval", "2", "--max-new-tokens", "4", "--output-dir", "runs/compare")
    out = _run(tmp_path, "compare_qlora_lora.py", "--model", str(tiny_gemma3_path), *data, *smoke)
    assert out.count("BLEU-4") == 2 and "qlora:" in out and "lora:" in out
    assert (tmp_path / "runs" / "compare" / "report.md").exists()
    source = (EXAMPLES / "compare_qlora_lora.py").read_text(encoding="utf-8")
    assert re.findall(r"^(?:from|import) (persian_qlora[\w.]*)", source, re.M) == ["persian_qlora"]
