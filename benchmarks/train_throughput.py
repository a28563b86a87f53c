"""QLoRA training throughput and peak memory: TRL's SFTTrainer baselines against persian-qlora's defaults.

Same model, same conversations, same labels, same number of optimizer steps (the padded settings batch by length,
the others in the same random order); each setting runs in a fresh process so that its peak memory is its own. The
model is a small-but-wide Gemma 3 with Gemma's full 262,144-token vocabulary, where the LM head and the loss
dominate, as they do for Gemma-3-1B. The data are multi-turn
conversations chained from the bundled corpus to a persian-gk-like length distribution (log-normal, mean about 310
tokens, a tail to 4000).

Bases (``--base``):
  pretrained-like (default)
                  the model's <end_of_turn> row has 100 near-copies among rows the tokenizer never produces, as a
                  pretrained (not instruction-tuned) Gemma's sits among its <unused*> rows. The row is not
                  distinct, so the defaults train it with the adapter (``train_turn_end``): peft wraps the tied
                  head in trainable token rows. TRL 1.16's SFTTrainer cannot train such a head (its fused LM
                  head reads ``lm_head.bias``, which peft's wrapper lacks: AttributeError), so its baselines train
                  LoRA alone: they do less work than the defaults, and do not learn to end their turns.
  random          the random model as built: its <end_of_turn> row is distinct, nothing is added to LoRA.
  gemma3-270m     the real Gemma 3 270M (pretrained, the gemma3-270m extra: ``prepare_base("gemma3-270m")``) with
                  its own tokenizer: its <end_of_turn> row sits among the <unused*> rows, so the defaults train it,
                  on the real 262,144-row tied head. Hidden 640 and 18 layers: the layers weigh more beside the
                  head than in the wide tiny model.

Settings:
  baseline        TRL SFTTrainer, default SFTConfig but for the recipe's batch 2 x grad-accum 4, max_length 4000
                  (the default 1024 would cut the tail, so the sides would see different tokens), the recipe's
                  optimizer, and bf16 as ours (fp32 on CPU). It gets our model-turn labels (SFTTrainer uses a
                  `labels` column as is), so both sides learn the same thing; it pads each batch and computes
                  logits at every position (in chunks: TRL 1.16's fused LM head, which on a device without Triton
                  projects every position, pads included, and recomputes each chunk in the backward pass).
  baseline padding-free
                  the same with TRL's best CPU setting, padding_free=True: each batch in one row, no padding
                  (TRL's other speed options, Liger kernels and hub kernels, need a GPU or the hub; packing
                  changes the batches, so the sides would not take the same steps).
  padded          persian-qlora, padding_free=False (grouped by length), lean_loss=False
  padded + lean   persian-qlora, padding_free=False, lean_loss=True
  packed          persian-qlora, padding_free=True, lean_loss=False
  defaults        persian-qlora's defaults: padding_free=True, lean_loss=True

Real tokens are non-pad input tokens; every setting processes the same ones. Their fraction is real / computed
positions. Tokens per CPU-second divide them by the process's CPU time (all its threads) over training: on a busy
machine it moves less than wall-clock tokens/s, which is what the targets are set on (on an idle machine the two
agree up to the thread count). Memory: peak RSS of the process on CPU, CUDA max allocated/reserved on a GPU.

    python benchmarks/train_throughput.py                    # the full table (about 16 minutes on 2 CPU cores)
    python benchmarks/train_throughput.py --settings baseline "baseline padding-free" defaults   # the TRL ratios
    python benchmarks/train_throughput.py --conversations 16 --settings baseline defaults   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# TRL refuses max_length with padding_free and no packing; the conversations are already cut to 4000 tokens.
TRL_SETTINGS = {"baseline": {"max_length": 4000}, "baseline padding-free": {"padding_free": True, "max_length": None}}
SETTINGS = {
    **TRL_SETTINGS,
    "padded": {"padding_free": False, "lean_loss": False},
    "padded + lean": {"padding_free": False, "lean_loss": True},
    "packed": {"padding_free": True, "lean_loss": False},
    "defaults": {},
}
TARGETS = {
    "baseline": "real-token fraction >= 0.97, tokens/s >= 2.0, peak memory <= 0.5",
    "baseline padding-free": "tokens/s >= 1.3, peak memory <= 0.8",
}
BATCH, ACCUMULATION = 2, 4
# Gemma's 262,144 vocabulary rows. The tiny tokenizer learns every token the bundled train split allows (7,688), so
# Persian splits into few pieces, as Gemma's tokenizer splits it; the other rows, like Gemma's foreign-script ones,
# are never a label, but every logit is projected and normalised.
GEMMA_VOCAB = 262_144
WIDE_GEMMA = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    sliding_window=512,
)


def prepare(workdir: Path, count: int, base: str) -> None:
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    from persian_qlora import PersianChatDataset
    from persian_qlora.testing import build_tiny_gemma, chained_conversations, lognormal_lengths, plant_turn_end_copies

    if base == "gemma3-270m":
        from persian_qlora.bases import prepare_base

        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "model").symlink_to(prepare_base("gemma3-270m"), target_is_directory=True)
    else:
        build_tiny_gemma(workdir / "model", "gemma3", vocab_size=GEMMA_VOCAB, **WIDE_GEMMA)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    if base == "pretrained-like":  # near-copies among the rows no token maps to, as Gemma's <unused*> rows
        plant_turn_end_copies(workdir / "model", range(len(tokenizer), len(tokenizer) + 100))
    records = chained_conversations(tokenizer, lognormal_lengths(count))
    dataset = PersianChatDataset(records, tokenizer, max_length=4000, deduplicate=False)
    Dataset.from_list([dataset[i] for i in range(len(dataset))]).save_to_disk(workdir / "data")
    lengths = sorted(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
    labelled = sum(sum(label != -100 for label in dataset[i]["labels"]) for i in range(len(dataset)))
    print(
        f"data: {len(lengths)} conversations, {sum(lengths)} tokens; mean {sum(lengths) / len(lengths):.0f}, "
        f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}; {labelled / sum(lengths):.0%} in model turns"
    )
    rows = AutoConfig.from_pretrained(workdir / "model").vocab_size
    print(f"model: {rows} vocabulary rows in its tied embedding and LM head; tokenizer: {len(tokenizer)} tokens")


class CountingCollator:
    """Wraps a collator to count real (non-pad) tokens and computed positions."""

    def __init__(self, collate, pad_token_id: int) -> None:
        self.collate, self.pad_token_id = collate, pad_token_id
        self.real = self.computed = 0

    def __call__(self, features):
        batch = self.collate(features)
        self.computed += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def worker(workdir: Path, setting: str, chunk_size: int | None) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from persian_qlora.measure import PhaseMeter
    from persian_qlora.modeling import LoraSettings, build_qlora_model
    from persian_qlora.training import TrainConfig, make_trainer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    data = load_from_disk(str(workdir / "data"))
    steps = len(data) // (BATCH * ACCUMULATION)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    # TRL 1.16's fused LM head reads `lm_head.bias`, which peft's trainable-token wrapper lacks (AttributeError):
    # SFTTrainer cannot train the <end_of_turn> row, so its sides train LoRA alone.
    lora = LoraSettings(train_turn_end=setting not in TRL_SETTINGS)
    model = build_qlora_model(str(workdir / "model"), lora=lora)
    common = dict(
        output_dir=str(workdir / "runs" / setting.replace(" ", "")),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=steps,
        optim="adamw_bnb_8bit",
        logging_steps=1,
        seed=3407,
    )
    if setting in TRL_SETTINGS:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            **common, **TRL_SETTINGS[setting], bf16=bf16, save_strategy="no", report_to="none", disable_tqdm=True
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    else:
        settings = dict(SETTINGS[setting])
        if chunk_size:
            settings["loss_chunk_size"] = chunk_size
        extra = {"bf16": bf16, "save_strategy": "no", "disable_tqdm": True}
        config = TrainConfig(**common, learning_rate=2e-5, warmup_steps=10, extra=extra, **settings)
        trainer = make_trainer(model, tokenizer, data, config=config)
    trainer.data_collator = counter = CountingCollator(trainer.data_collator, tokenizer.pad_token_id)
    load_before, cpu_started = os.getloadavg()[0], time.process_time()
    with PhaseMeter(model.device) as meter:
        trainer.train()
    cpu_seconds = time.process_time() - cpu_started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "setting": setting,
        "trained_token_rows": type(model.get_output_embeddings()).__name__ == "TrainableTokensWrapper",
        "steps": trainer.state.global_step,
        "seconds": meter.result.seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens": counter.real,
        "computed_positions": counter.computed,
        "memory": meter.result.memory,
        "peak_gb": meter.result.peak_gb,
        "first_loss": losses[0] if losses else None,
        "load_average": [load_before, os.getloadavg()[0]],  # the machine's 1-minute load, before and after
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=48, help="a multiple of 8 (batch 2 x accumulation 4)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--chunk-size", type=int, help="loss_chunk_size for the lean loss (default: the library's)")
    parser.add_argument("--base", choices=["pretrained-like", "random", "gemma3-270m"], default="pretrained-like")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.result.write_text(json.dumps(worker(args.workdir, args.worker, args.chunk_size)))
        return

    import torch
    import transformers
    import trl

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-throughput-"))
    prepare(workdir, args.conversations, args.base)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    print(f"device: {device}; {versions}")
    results = {}
    for setting in args.settings:
        result_file = workdir / f"{setting.replace(' ', '')}.json"
        command = [sys.executable, __file__, "--worker", setting, "--workdir", str(workdir)]
        command += ["--result", str(result_file)]
        if args.chunk_size:
            command += ["--chunk-size", str(args.chunk_size)]
        subprocess.run(command, check=True)
        results[setting] = json.loads(result_file.read_text())

    columns = "setting | optimizer steps | real-token fraction | real tokens/s | peak memory (GB) | seconds"
    print(f"\n| {columns} | real tokens per CPU-second | first loss | head with trained rows | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["fraction"] = r["real_tokens"] / r["computed_positions"]
        r["tokens_per_second"] = r["real_tokens"] / r["seconds"]
        print(
            f"| {name} | {r['steps']} | {r['fraction']:.3f} | {r['tokens_per_second']:.0f} | {r['peak_gb']:.2f} "
            f"| {r['seconds']:.1f} | {r['real_tokens'] / r['cpu_seconds']:.0f} | {r['first_loss']:.4f} "
            f"| {'yes' if r['trained_token_rows'] else 'no'} "
            f"| {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f} |"
        )
    for baseline, targets in TARGETS.items():
        if baseline not in results or len(results) == 1:
            continue
        base = results[baseline]
        print(f"\nratios to {baseline} (targets for the defaults: {targets})")
        for name, r in results.items():
            if name not in TRL_SETTINGS:
                speed = r["tokens_per_second"] / base["tokens_per_second"]
                per_cpu = base["cpu_seconds"] / r["cpu_seconds"]
                memory = r["peak_gb"] / base["peak_gb"]
                print(
                    f"- {name}: tokens/s x{speed:.2f}, tokens per CPU-second x{per_cpu:.2f}, peak memory x{memory:.2f}"
                )
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
