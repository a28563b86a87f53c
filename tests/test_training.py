"""make_trainer: the reference recipe, learning on a repeated batch, metrics, and resuming a stopped run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from persian_qlora import ConfigError, PersianChatDataset
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


def test_fp16_is_refused_however_it_is_set(tmp_path):
    from persian_qlora.training import RunConfig

    with pytest.raises(ConfigError, match=r"fp16=True is refused for Gemma: its activations overflow fp16.*fp32"):
        TrainConfig(output_dir=str(tmp_path), extra={"fp16": True}).training_arguments()
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path / 'run'}\nfp16: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="fp16=True is refused"):
        RunConfig.load(yaml_file)
    assert TrainConfig(output_dir=str(tmp_path), extra={"fp16": False}).training_arguments().fp16 is False


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


def _overfitting_run(path, output_dir, **settings):
    """LoRA at a high learning rate on two repeated conversations, evaluated every step on six others: the held-out
    loss falls for three steps, then rises (deterministic on CPU)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    train, held_out = [dataset[i] for i in range(2)] * 8, [dataset[i] for i in range(10, 16)]
    config = _small_config(output_dir, learning_rate=3e-2, max_steps=8, save_steps=1, eval_steps=1, **settings)
    torch.manual_seed(0)
    trainer = make_trainer(build_lora_model(path), tokenizer, train, held_out, config=config)
    trainer.train()
    return trainer


def test_held_out_evaluation_stops_early_and_ends_on_the_best_checkpoint(tiny_gemma3_path, tmp_path):
    trainer = _overfitting_run(tiny_gemma3_path, tmp_path, load_best_model_at_end=True, early_stopping_patience=2)
    evals = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    best_step, best_loss = min(evals, key=lambda pair: pair[1])
    assert [step for step, _ in evals] == list(range(1, len(evals) + 1))  # every eval_steps
    assert trainer.state.global_step == best_step + 2 < 8  # two evaluations without improvement, then stop
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")

    best = load_file(tmp_path / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    last = load_file(tmp_path / f"checkpoint-{trainer.state.global_step}" / "adapter_model.safetensors")
    trainer.save_model(str(tmp_path / "final"))
    final = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert any(not torch.equal(best[name], last[name]) for name in best)
    for name, tensor in best.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_eval_loss"] == pytest.approx(best_loss) and len(metrics["eval_log"]) == len(evals)


def test_the_lean_eval_loss_equals_the_plain_one(tiny_gemma3_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=200)
    held_out = [dataset[i] for i in range(7)]  # 4 batches of 2, the last one short
    losses = {}
    for lean in (True, False):
        config = _small_config(tmp_path / str(lean), lean_loss=lean)
        trainer = make_trainer(build_lora_model(tiny_gemma3_path), tokenizer, held_out, held_out, config=config)
        losses[lean] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_evaluation_settings_that_cannot_work_are_refused_at_once(tmp_path):
    from persian_qlora.training import RunConfig

    with pytest.raises(ConfigError, match="need an evaluation set"):
        RunConfig.load(None, {"output_dir": str(tmp_path), "early_stopping_patience": 3})
    with pytest.raises(ConfigError, match=r"save_steps \(50\) must be a multiple of eval_steps \(30\)"):
        RunConfig.load(None, {"eval_fraction": 0.1, "eval_steps": 30, "load_best_model_at_end": True})
    aligned = RunConfig.load(None, {"eval_fraction": 0.1, "load_best_model_at_end": True, "save_steps": 20})
    arguments = aligned.train.training_arguments(evaluate=True)
    assert (arguments.eval_strategy.value, arguments.eval_steps, arguments.metric_for_best_model) == (
        "steps",
        20,
        "eval_loss",
    )
    with pytest.raises(ConfigError, match="not both"):
        RunConfig.load(None, {"eval_fraction": 0.1, "eval_data": "some/dataset"})
    with pytest.raises(ConfigError, match="eval_fraction must be"):
        RunConfig.load(None, {"eval_fraction": 1.0})
    with pytest.raises(ConfigError, match="on_error must be"):
        RunConfig.load(None, {"on_error": "ignore"})


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"eval_data": "mshojaei77/persian-gk", "eval_split": "test"}, "test split"),
        ({"eval_data": "mshojaei77/persian-gk", "eval_split": "train"}, "training data itself"),
        ({"tiny": True, "eval_data": "BUNDLED_TEST"}, "test split"),
        ({"tiny": True, "eval_data": "BUNDLED_TRAIN"}, "training data itself"),
        ({"eval_data": "mshojaei77/persian-gk", "eval_split": "validation"}, None),
        ({"eval_data": "other/dataset", "eval_split": "test"}, None),
    ],
)
def test_the_test_split_of_the_training_data_is_never_the_eval_set(settings, refused):
    from persian_qlora.dataset import bundled_corpus_path
    from persian_qlora.training import RunConfig

    bundled = {"BUNDLED_TEST": str(bundled_corpus_path("test")), "BUNDLED_TRAIN": str(bundled_corpus_path("train"))}
    settings = {k: bundled.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    if refused is None:
        assert RunConfig.load(None, settings).eval_data == settings["eval_data"]
    else:
        with pytest.raises(ConfigError, match=refused):
            RunConfig.load(None, settings)


def test_a_held_out_fraction_is_drawn_with_the_seed_and_not_trained_on(tiny_tokenizer):
    from persian_qlora.training import RunConfig

    def split(seed):
        config = RunConfig.load(None, {"tiny": True, "eval_fraction": 0.25, "seed": seed})
        train, held_out = config.load_datasets(tiny_tokenizer)
        return train.indices, held_out.indices, len(train.dataset)

    train, held_out, total = split(3407)
    assert len(held_out) == round(total * 0.25) and sorted(train + held_out) == list(range(total))
    assert split(3407)[1] == held_out and split(1)[1] != held_out
