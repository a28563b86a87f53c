"""A long job never loses work: NaN guard, resuming after SIGKILL, ignoring a checkpoint cut off mid-save."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from persian_qlora import NonFiniteError, PersianChatDataset
from persian_qlora.modeling import build_qlora_model
from persian_qlora.training import TrainConfig, latest_checkpoint, make_trainer


class _PoisonAfter(TrainerCallback):
    """Sets one LoRA weight to NaN after optimizer step ``step``: the next forward's loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            weight = next(p for n, p in model.named_parameters() if "lora_A" in n)
            with torch.no_grad():
                weight[0, 0] = float("nan")


def test_a_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_gemma3_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    config = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        save_steps=2,
        warmup_steps=0,
        gradient_accumulation_steps=1,
        extra={"disable_tqdm": True},
    )
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    trainer = make_trainer(
        build_qlora_model(tiny_gemma3_path), tokenizer, dataset, config=config, callbacks=[_PoisonAfter(3)]
    )
    with pytest.raises(NonFiniteError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "optimizer step 4: the loss is nan" in message and "fp16" in message and "learning rate" in message
    assert caught.value.last_checkpoint == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    adapter = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_a_checkpoint_cut_off_while_saving_is_never_resumed(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    partial = tmp_path / "checkpoint-6"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    (partial / "trainer_state.json").write_text('{"global_st')  # killed while writing the state itself
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert latest_checkpoint(tmp_path / "nothing-here") is None


_TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from transformers import TrainerCallback
    from persian_qlora.training import RunConfig, run_training

    class Slow(TrainerCallback):  # gives the test time to kill the run between checkpoints
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(float(sys.argv[2]))

    config = RunConfig.load(None, {"tiny": True, "output_dir": sys.argv[1], "max_steps": 8, "save_steps": 2,
                                   "learning_rate": 1e-3, "max_length": 128, "disable_tqdm": True})
    run_training(config, resume=sys.argv[3] == "resume", callbacks=[Slow()])
    """
)


def _train(tmp_path, output, pause, mode, wait=True):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(output), str(pause), mode], stderr=subprocess.PIPE)
    if wait:
        assert process.wait() == 0, process.stderr.read().decode()[-3000:]
    return process


def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path):
    _train(tmp_path, tmp_path / "straight", 0, "fresh")

    killed = _train(tmp_path, tmp_path / "killed", 1.0, "fresh", wait=False)
    state = tmp_path / "killed" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 240
    while not state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert state.exists(), "the run never reached checkpoint 4"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()

    _train(tmp_path, tmp_path / "killed", 0, "resume")
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    worst = max(float((resumed[name] - tensor).abs().max()) for name, tensor in expected.items())
    print(f"resumed vs uninterrupted: max |difference| = {worst:.2e}")
    assert worst <= 1e-5, worst
