"""A run's settings: the example config a user copies, sectioned and flat YAML, unknown keys, and the model and
data settings reaching the builder and the dataset."""

import json
import re
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from persian_qlora import ConfigError, NormalizerConfig
from persian_qlora.cli import _run_config, build_parser, main
from persian_qlora.training import SECTIONS, RunConfig, run_training

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "run.yaml"


def test_the_example_config_sets_every_setting_with_a_comment():
    sections = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert {name: set(keys) - set(SECTIONS[name]) for name, keys in sections.items()} == {
        "model": set(),
        "data": set(),
        "lora": set(),
        "train": {"bf16"},  # one TrainingArguments field, as an example of those
    }
    assert {name: set(SECTIONS[name]) - set(keys) for name, keys in sections.items()} == {
        name: set() for name in SECTIONS
    }
    setting = re.compile(r"^\s*\w+:")
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if setting.match(line):
            assert "#" in line, f"no comment on: {line}"
    # Its values are the reference recipe's (the defaults), but for naming its own output directory.
    example = RunConfig.load(EXAMPLE)
    example.train.extra.pop("bf16")
    defaults = RunConfig.load(None, {"output_dir": sections["train"]["output_dir"]})
    assert example == defaults


def test_the_example_config_trains_with_tiny_and_reports_to_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ["train", "--config", str(EXAMPLE), "--tiny", "--output-dir", str(run), "--max_steps", "1"]
    args += ["--gradient_accumulation_steps", "1", "--max_length", "256", "--report_to", "tensorboard"]
    assert main([*args, "--disable_tqdm", "true"]) == 0, capsys.readouterr().err
    assert (run / "adapter_model.safetensors").exists()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 1
    events = list((run / "runs").rglob("events.out.tfevents.*"))
    assert events, "report_to tensorboard wrote no event file under output_dir/runs"
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1]


SECTIONED = """
model:
  name_or_path: some/gemma
  method: lora
  attn_implementation: eager
  text_only: false
  device_map: auto
  per_layer_embeddings_on_host: false
data:
  name_or_path: chat.jsonl
  data_format: alpaca
  columns: {instruction: soal, output: javab}
  normalize: {digits: fa, spacing: false}
  on_error: skip
  max_length: 512
lora:
  r: 4
  alpha: 8
  target_modules: [q_proj, v_proj]
train:
  learning_rate: 1e-4
  report_to: tensorboard
  max_grad_norm: 0.3
"""
FLAT = """
model: some/gemma
method: lora
attn_implementation: eager
text_only: false
device_map: auto
per_layer_embeddings_on_host: false
data: chat.jsonl
data_format: alpaca
columns: {instruction: soal, output: javab}
normalize: {digits: fa, spacing: false}
on_error: skip
max_length: 512
lora_r: 4
lora_alpha: 8
lora_target_modules: [q_proj, v_proj]
learning_rate: 1e-4
report_to: tensorboard
max_grad_norm: 0.3
"""


def test_sectioned_and_flat_yaml_give_the_same_run_config(tmp_path):
    (tmp_path / "sectioned.yaml").write_text(SECTIONED, encoding="utf-8")
    (tmp_path / "flat.yaml").write_text(FLAT, encoding="utf-8")
    sectioned, flat = RunConfig.load(tmp_path / "sectioned.yaml"), RunConfig.load(tmp_path / "flat.yaml")
    assert sectioned == flat
    assert (sectioned.model, sectioned.data, sectioned.lora.r, sectioned.train.learning_rate) == (
        "some/gemma",
        "chat.jsonl",
        4,
        1e-4,
    )
    assert sectioned.normalize == NormalizerConfig(digits="fa", spacing=False)
    assert sectioned.train.extra == {"max_grad_norm": 0.3} and sectioned.train.max_length == 512
    assert sectioned.model_settings() == {
        "text_only": False,
        "attn_implementation": "eager",
        "device_map": "auto",
        "per_layer_embeddings_on_host": False,
    }
    # A mix of both, and sections in overrides, read the same.
    mixed = RunConfig.load(
        None, {**yaml.safe_load(SECTIONED), "lora": {"r": 4, "alpha": 8}, "lora_target_modules": ["q_proj", "v_proj"]}
    )
    assert mixed == flat


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"learning_rat": 1e-3}, "unknown setting 'learning_rat'; did you mean 'learning_rate'?"),
        (
            {"train": {"learning_rat": 1e-3}},
            "unknown setting 'learning_rat' in the train: section; did you mean 'learning_rate'?",
        ),
        ({"lora": {"alpah": 16}}, "unknown setting 'alpah' in the lora: section; did you mean 'alpha'?"),
        ({"lora": {"rank": 8}}, "the lora: section takes ['alpha', 'bias', 'dropout', 'extra', 'r', "),
        ({"lora_rank": 8}, "unknown setting 'lora_rank'; did you mean 'lora_r'?"),  # LLaMA-Factory's name
        ({"sequence_len": 1024}, "did you mean 'max_length'?"),  # axolotl's
        ({"r": 8}, "unknown setting 'r'; did you mean 'lora_r'?"),
        ({"model": {"learning_rate": 1e-3}}, "it belongs in the train: section as 'learning_rate'"),
        ({"train": {"lora_r": 8}}, "it belongs in the lora: section as 'r'"),
        ({"data": {"path": "x.jsonl"}}, "the data: section takes ["),
        ({"lora_r": 8, "lora": {"r": 4}}, "'lora_r' is set twice"),
        ({"lora": 8}, "'lora' is a section"),
        ({"normalize": {"digit": "fa"}}, "did you mean 'digits'?"),
        ({"data": {"data_format": "alpacca"}}, "did you mean 'alpaca'?"),
        ({"columns": {"instructions": "q"}}, "did you mean 'instruction'?"),
    ],
)
def test_unknown_keys_are_refused_naming_the_nearest(settings, message):
    with pytest.raises(ConfigError) as caught:
        RunConfig.load(None, settings)
    assert message in str(caught.value)


def test_unknown_keys_in_a_yaml_file_are_refused_before_anything_loads(tmp_path, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text("model:\n  name_or_pth: google/gemma-3-1b-it\n", encoding="utf-8")
    assert main(["train", "--config", str(settings)]) == 2
    assert (
        "unknown setting 'name_or_pth' in the model: section; did you mean 'name_or_path'?" in capsys.readouterr().err
    )


def test_report_to_an_integration_that_is_not_installed_is_refused_at_once():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"report_to 'wandb': transformers finds no wandb package here; install it"):
        RunConfig.load(None, {"report_to": "wandb"})


def test_the_command_line_reaches_the_model_and_data_settings():
    args, extra = build_parser().parse_known_args(
        ["train", "--data-format", "alpaca", "--columns", "{instruction: soal, output: javab}", "--normalize", "false"]
        + ["--attn-implementation", "eager", "--text-only", "false", "--device-map", "auto"]
        + ["--per-layer-embeddings-on-host", "false", "--report-to", "tensorboard"]
    )
    config = _run_config(args, extra)
    assert (config.data_format, config.columns, config.normalize) == (
        "alpaca",
        {"instruction": "soal", "output": "javab"},
        None,
    )
    assert config.model_settings() == {
        "text_only": False,
        "attn_implementation": "eager",
        "device_map": "auto",
        "per_layer_embeddings_on_host": False,
    }
    assert config.train.report_to == "tensorboard"


class _Seen(TrainerCallback):
    def on_train_begin(self, args, state, control, *, model, train_dataloader, **kwargs):
        self.attention = model.config._attn_implementation
        self.dataset = train_dataloader.dataset


def test_model_and_data_settings_reach_the_builder_and_the_dataset(tiny_gemma3_path, tmp_path):
    data = tmp_path / "qa.jsonl"
    records = [{"soal": "كتاب ها را مي خواهي؟", "javab": "بله"}, {"soal": "سلام", "javab": "درود!"}]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    settings = {
        "model": {"name_or_path": str(tiny_gemma3_path), "method": "lora", "attn_implementation": "eager"},
        "data": {
            "name_or_path": str(data),
            "data_format": "alpaca",
            "columns": {"instruction": "soal", "output": "javab"},
        }
        | {"normalize": False, "max_length": 128},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "gradient_accumulation_steps": 1}
        | {"save_strategy": "no", "disable_tqdm": True},
    }
    seen = _Seen()
    run_training(RunConfig.load(None, settings), callbacks=[seen])
    assert seen.attention == "eager"
    assert seen.dataset.stats.data_format == "alpaca" and not seen.dataset.stats.data_format_detected
    assert seen.dataset.conversations[0][0]["content"] == records[0]["soal"]  # normalize: false kept ك and ي
