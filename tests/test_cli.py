import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from persian_qlora.cli import main, render_masked
from persian_qlora.training import TrainConfig


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


def test_train_then_merge_offline(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--tiny", "--output-dir", str(run), "--max_steps", "2", "--save_steps", "1"]
    assert main([*args, "--learning_rate", "1e-3", "--lora_r", "4", "--disable_tqdm", "true"]) == 0
    assert (run / "adapter_model.safetensors").exists() and (run / "metrics.json").exists()
    assert json.loads((run / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--output", str(merged), "--merge-base", "nf4", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: every tensor re-read and checked" in out and "verify: max |logit difference|" in out
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["merge", "--adapter", str(run), "--output", str(merged)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_train_rejects_a_misspelt_setting_before_loading_anything(capsys):
    assert main(["train", "--tiny", "--learning_rat", "1e-3"]) == 2
    assert "unknown setting 'learning_rat'; did you mean 'learning_rate'?" in capsys.readouterr().err


def test_train_refuses_fp16_from_the_command_line(tmp_path, capsys):
    assert main(["train", "--tiny", "--output-dir", str(tmp_path / "run"), "--fp16", "true"]) == 2
    assert "fp16=True is refused for Gemma" in capsys.readouterr().err


def test_other_commands_reject_unknown_flags():
    import pytest

    with pytest.raises(SystemExit):
        main(["prepare", "--bogus", "1"])


def test_train_reaches_held_out_evaluation_and_on_error_from_yaml_and_flags(tiny_gemma3_path, tmp_path, capsys):
    from persian_qlora.dataset import bundled_corpus_path

    records = bundled_corpus_path("train").read_text(encoding="utf-8").splitlines()[:12]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join([*records, '{"messages": [{"role": "bot2", "content": "x"}]}']) + "\n", encoding="utf-8")
    settings = tmp_path / "run.yaml"
    settings.write_text(f"model: {tiny_gemma3_path}\ndata: {data}\nmethod: lora\neval_fraction: 0.25\n")
    run = tmp_path / "run"
    args = ["train", "--config", str(settings), "--output-dir", str(run), "--max_steps", "2", "--save_steps", "2"]
    args += ["--eval_steps", "1", "--disable_tqdm", "true", "--per_device_train_batch_size", "2"]

    assert main(args) == 2  # on_error defaults to "raise": the bad record stops the run before it starts
    assert "chat.jsonl line 13, message 0: has unknown role 'bot2'" in capsys.readouterr().err
    assert main([*args, "--on_error", "skip"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["eval_log"]] == [1, 2]
    assert (run / "eval_loss.png").exists()


def test_train_help_says_when_to_raise_the_learning_rate_with_the_sweeps_own_figures(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    results = (Path(__file__).parents[1] / "docs" / "results.md").read_text(encoding="utf-8")
    sweep = {
        row[0]: row[1:]
        for row in re.findall(r"^\| \**([0-9e.-]+)\b[^|]*\| \**([0-9.]+)\** \| \**([0-9.]+)", results, re.M)
    }
    assert f"default {TrainConfig().learning_rate:.0e}".replace("e-05", "e-5") in text
    assert f"{sweep['2e-5'][0]} -> {sweep['2e-5'][1]} at 2e-5 against {sweep['1e-3'][1]} at 1e-3" in text
    assert "--learning_rate" in text and "docs/models.md" in text


def test_every_command_that_writes_takes_output_and_output_dir_alike():
    from persian_qlora.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    writers = {}
    for name, command in commands.items():
        flags = {flag for action in command._actions for flag in action.option_strings}
        assert ("--output" in flags) == ("--output-dir" in flags), name
        if "--output" in flags:
            writers[name] = command
    assert set(writers) == {"train", "merge", "export-gguf", "compare", "demo", "prepare-base"}
    required = {"merge": ["--adapter", "a"], "export-gguf": ["--model", "m"]}
    for name in writers:
        parsed = [
            vars(parser.parse_known_args([name, *required.get(name, []), flag, "somewhere"])[0])
            for flag in ("--output", "--output-dir")
        ]
        assert parsed[0] == parsed[1] and "somewhere" in parsed[0].values(), name


def test_chat_keeps_quantization_as_a_deprecated_name_of_load_in(tiny_gemma3_path):
    result = subprocess.run(
        [sys.executable, "-m", "persian_qlora.cli", "chat", "--model", str(tiny_gemma3_path), "--quantization", "4bit"],
        input="",
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FutureWarning: persian-qlora chat: --quantization is deprecated" in result.stderr
    assert "use --load-in" in result.stderr
