"""make_trainer: the reference recipe, learning on a repeated batch, metrics, and resuming a stopped run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from persian_qlora import PersianChatDataset
from persian_qlora.modeling import build_lora_model, build_qlora_model
from persian_qlora.training import TrainConfig, make_trainer


def test_defaults_are_the_reference_recipe(tmp_path):
    args = TrainConfig(output_dir=str(tmp_path)).training_arguments()
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps, args.weight_decay) == (
        2e-5,
        "linear",
        10,
        0.01,
    )
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (2, 4, 1)
    assert (args.seed, args.optim.value, args.logging_steps) == (3407, "adamw_bnb_8bit", 1)
    assert TrainConfig().max_length == 4000
    assert TrainConfig(extra={"max_grad_norm": 0.3}).training_arguments().max_grad_norm == 0.3
    with pytest.raises(ValueError, match="not TrainingArguments fields"):
        TrainConfig(extra={"learning_rat": 1.0}).training_arguments()


def _small_config(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir),
        learning_rate=2e-3,
        warmup_steps=0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=6,
        save_steps=3,
        extra={"disable_tqdm": True},
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("fixture", ["tiny_gemma3_path", "tiny_gemma3n_path"])
@pytest.mark.parametrize("builder", [build_qlora_model, build_lora_model], ids=["qlora", "lora"])
def test_a_few_steps_on_a_repeated_batch_lower_the_loss(request, tmp_path, fixture, builder):
    path = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(path)
    conversations = PersianChatDataset.bundled(tokenizer).conversations[:2]
    repeated = PersianChatDataset([{"messages": c} for c in conversations * 6], tokenizer, deduplicate=False)
    trainer = make_trainer(builder(path), tokenizer, repeated, config=_small_config(tmp_path))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert all("grad_norm" in e and "learning_rate" in e for e in trainer.state.log_history if "loss" in e)

    trainer.save_model()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["trained_tokens"] > 0
    assert metrics["trained_tokens_per_second"] > 0 and metrics["memory"]["cpu_peak_rss_gb"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "grad_norm.png").exists()
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_stopped_run_resumes_from_its_checkpoint(tiny_gemma3_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)

    def run(output_dir, callbacks=(), resume=None):
        torch.manual_seed(0)
        trainer = make_trainer(
            build_qlora_model(tiny_gemma3_path),
            tokenizer,
            dataset,
            config=_small_config(output_dir),
            callbacks=list(callbacks),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "stopped", callbacks=[_StopAt(3)])
    assert (tmp_path / "stopped" / "checkpoint-3").is_dir() and not (tmp_path / "stopped" / "checkpoint-6").exists()
    resumed = run(tmp_path / "stopped", resume=True)

    expected = load_file(tmp_path / "straight" / "checkpoint-6" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "stopped" / "checkpoint-6" / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-5)
    assert resumed.run_metrics.trained_tokens == straight.run_metrics.trained_tokens


def test_run_config_layers_recipe_yaml_and_overrides(tmp_path):
    from persian_qlora.training import RunConfig

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: lora\nlearning_rate: 1e-4\nlora_r: 16\nmax_grad_norm: 0.3\nnum_train_epochs: 2\n")
    config = RunConfig.load(yaml_file, {"learning_rate": "5e-5", "lora_target_modules": ["q_proj", "v_proj"]})
    assert config.method == "lora" and config.model == "google/gemma-3-1b-it"
    assert config.train.learning_rate == 5e-5 and isinstance(config.train.learning_rate, float)
    assert config.train.num_train_epochs == 2.0 and config.train.warmup_steps == 10
    assert config.lora.r == 16 and config.lora.alpha == 16
    assert config.lora.target_modules == ("q_proj", "v_proj")
    assert config.train.extra == {"max_grad_norm": 0.3}
    with pytest.raises(ValueError, match="must be a number"):
        RunConfig.load(None, {"learning_rate": "fast"})
    with pytest.raises(ValueError, match="method must be"):
        RunConfig.load(None, {"method": "full"})


def test_output_dir_from_a_config_is_resolved_and_checked(tmp_path, monkeypatch):
    from persian_qlora.training import RunConfig

    monkeypatch.chdir(tmp_path)
    assert RunConfig.load(None, {"output_dir": "runs/x"}).train.output_dir == str(tmp_path / "runs" / "x")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        RunConfig.load(None, {"output_dir": "a_file"})
    for bad in ("/", "~"):
        with pytest.raises(ValueError, match="root or home"):
            RunConfig.load(None, {"output_dir": bad})


def test_report_to_tensorboard_logs_loss_offline(tiny_gemma3_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    config = _small_config(tmp_path, max_steps=3, extra={"disable_tqdm": True, "report_to": ["tensorboard"]})
    make_trainer(build_lora_model(tiny_gemma3_path), tokenizer, dataset, config=config).train()
    events = [p for p in tmp_path.rglob("events.out.tfevents.*")]
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3]
    assert "train/grad_norm" in accumulator.Tags()["scalars"]
