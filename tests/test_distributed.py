"""DDP through accelerate on CPU: two processes train LoRA on the tiny Gemma.

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up (accelerate 1.15's
simple launcher), so the test uses `--multi_gpu`, which goes through torch.distributed.run and, with no GPU,
runs two CPU processes over gloo.
"""

import json
import subprocess
import sys
import textwrap

from peft import PeftModel
from transformers import AutoModelForCausalLM

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from persian_qlora import PersianChatDataset, TrainConfig, build_lora_model, make_trainer

    base, output = sys.argv[1], Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset = PersianChatDataset.bundled(tokenizer, max_length=128)
    model = build_lora_model(base)
    seen = []  # the first batch this rank trains on
    def record(module, args):
        if not seen:
            seen.append(args[0].tolist())
    model.get_input_embeddings().register_forward_pre_hook(record)
    config = TrainConfig(output_dir=str(output), max_steps=3, save_steps=3, gradient_accumulation_steps=1,
                         extra={"disable_tqdm": True, "ddp_backend": "gloo"})
    trainer = make_trainer(model, tokenizer, dataset, config=config)
    trainer.train()
    trainer.save_model()
    rank = os.environ.get("RANK", "0")
    (output.parent / f"rank{rank}.json").write_text(json.dumps({"world": trainer.args.world_size, "batch": seen[0]}))
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
    assert all(rank["world"] == 2 for rank in ranks)
    assert ranks[0]["batch"] != ranks[1]["batch"]  # each rank trains on its own shard
    assert (output / "adapter_model.safetensors").exists() and (output / "metrics.json").exists()
    assert json.loads((output / "metrics.json").read_text())["global_step"] == 3
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-3"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma3_path), output)
    assert any("lora_B" in name for name, _ in model.named_parameters())
