"""DDP through accelerate on CPU: two processes train LoRA on the tiny Gemma.

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up (accelerate 1.15's
simple launcher), so the test uses `--multi_gpu`, which goes through torch.distributed.run and, with no GPU,
runs two CPU processes over gloo. The script sets `use_cpu=True`: without it, accelerate does not see a
multi-CPU run, and the two processes train apart, each on its shard, with no DDP between them.
"""

import inspect
import json
import subprocess
import sys
import textwrap

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from persian_qlora import TrainConfig, build_lora_model, make_trainer


def conversations(tokenizer):
    """12 conversations: one epoch is 3 steps of 2 per rank on 2 ranks, or of 4 in one process."""
    from persian_qlora import PersianChatDataset

    return [PersianChatDataset.bundled(tokenizer, max_length=128)[i] for i in range(12)]


_SCRIPT = inspect.getsource(conversations) + textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from persian_qlora import TrainConfig, build_lora_model, make_trainer

    base, output = sys.argv[1], Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset = conversations(tokenizer)
    model = build_lora_model(base)
    seen = []  # the first batch this rank trains on
    def record(module, args):
        if not seen:
            seen.append(args[0].tolist())
    model.get_input_embeddings().register_forward_pre_hook(record)
    config = TrainConfig(output_dir=str(output), save_steps=3, gradient_accumulation_steps=1,
                         extra={"disable_tqdm": True, "ddp_backend": "gloo", "use_cpu": True})
    trainer = make_trainer(model, tokenizer, dataset, config=config)
    trainer.train()
    trainer.save_model()
    rank = os.environ.get("RANK", "0")
    wrapped = type(trainer.model_wrapped).__name__
    report = {"world": trainer.args.world_size, "batch": seen[0], "wrapped": wrapped}
    (output.parent / f"rank{rank}.json").write_text(json.dumps(report))
    """
)


def test_two_cpu_processes_train_on_different_shards_and_rank0_writes(tiny_gemma3_path, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_SCRIPT)
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tiny_gemma3_path),
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world"] == 2 and rank["wrapped"] == "DistributedDataParallel" for rank in ranks)
    assert ranks[0]["batch"] != ranks[1]["batch"]  # each rank trains on its own shard
    assert (output / "adapter_model.safetensors").exists() and (output / "metrics.json").exists()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert [memory["device"] for memory in metrics["memory_by_rank"]] == ["cpu", "cpu"]

    # The same conversations in one process, 4 per step: the token count is the whole run's, not rank 0's share.
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    config = TrainConfig(
        output_dir=str(tmp_path / "single"),
        save_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        extra={"disable_tqdm": True},
    )
    single = make_trainer(build_lora_model(tiny_gemma3_path), tokenizer, conversations(tokenizer), config=config)
    single.train()
    assert single.state.global_step == 3
    assert metrics["trained_tokens"] == single.run_metrics.trained_tokens
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-3"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma3_path), output)
    assert any("lora_B" in name for name, _ in model.named_parameters())


def test_a_rank_that_does_not_save_writes_nothing(tiny_gemma3_path, tmp_path, monkeypatch):
    """Under DDP every rank calls ``_save``; only the writing rank creates the checkpoint folder. A rank that
    wrote the base's provenance file into a folder rank 0 had not made yet crashed the run."""
    from transformers import TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    config = TrainConfig(output_dir=str(tmp_path / "out"), extra={"disable_tqdm": True})
    trainer = make_trainer(build_lora_model(tiny_gemma3_path), tokenizer, conversations(tokenizer)[:2], config=config)
    monkeypatch.setattr(TrainingArguments, "should_save", property(lambda self: False))
    trainer.save_model(str(tmp_path / "checkpoint-1"))
    assert not (tmp_path / "checkpoint-1").exists()
