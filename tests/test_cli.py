import json
import subprocess
import sys

from persian_qlora.cli import main, render_masked


def test_prepare_prints_stats_and_a_masked_example(capsys):
    assert main(["prepare"]) == 0
    out = capsys.readouterr().out
    assert "conversations kept" in out and "tokens per Persian word" in out
    assert "⟦" in out and "<end_of_turn>⟧" in out


def test_prepare_json(capsys, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود"}]})
        + "\n",
        encoding="utf-8",
    )
    assert main(["prepare", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 1


def test_prepare_reports_bad_data_without_a_traceback(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "bot2", "content": "x"}]}\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "persian_qlora.cli", "prepare", "--data", str(data)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "chat.jsonl line 1, message 0: has unknown role 'bot2'" in result.stderr
    assert "Traceback" not in result.stderr


def test_render_masked_marks_only_trained_runs(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ab", add_special_tokens=False) + [tiny_tokenizer.convert_tokens_to_ids("<eos>")]
    labels = [-100] * (len(ids) - 1) + [ids[-1]]
    assert render_masked(tiny_tokenizer, ids, labels) == "ab⟦<eos>⟧"
