"""QLoRA and LoRA at real Gemma sizes, on a GPU: peak memory, tokens/s and seconds per optimizer step.

The architectures are built from their published dimensions with random weights (no hub): Gemma-3-1B (hidden 1152,
26 layers, 4 heads, 1 KV head, head_dim 256, intermediate 6912, vocabulary 262,144) and Gemma-3n-E4B's language
model, from the whole multimodal E4B (transformers' `Gemma3nConfig` defaults are E4B's: vision and audio towers
included) saved in the hub's layout and loaded text-only, as a user's `google/gemma-3n-E4B-it` is. Speed and memory
do not depend on the weights' values. Each model is built once on the CPU, directly in bf16 (never in fp32, never on
the GPU: E4B in fp32 is about 31 GB), and saved; then each method, in a fresh process so that its CUDA peak is its
own, loads it through persian-qlora's builders and trains a few optimizer steps at batch 2 x 1024 tokens (multi-turn
Persian conversations from the bundled corpus, persian-qlora's defaults). The peak is measured from before the load,
so it includes whatever the load puts on the GPU (E4B's per-layer embeddings must not be there), as a user sees it.
The first step is a warm-up and is not timed.

    python benchmarks/gpu_scale.py                        # on a CUDA GPU; targets: E4B QLoRA <= 6 GB,
                                                          # 1B QLoRA <= 3 GB, QLoRA tokens/s >= 0.8 x LoRA
    python benchmarks/gpu_scale.py --smoke                # CPU check of the script: 2 layers, 128 tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GEMMA3_1B = dict(
    hidden_size=1152,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    intermediate_size=6912,
    vocab_size=262_144,
    query_pre_attn_scalar=256,
    sliding_window=512,
    rope_theta=1_000_000.0,
    max_position_embeddings=32_768,
)
MODELS = ("gemma-3-1b", "gemma-3n-e4b")
METHODS = ("qlora", "lora")


def build(name: str, path: Path, layers: int | None) -> None:
    """Save a random-weight model of the published architecture (bf16), with the tiny Gemma-style tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3nForConditionalGeneration, Gemma3TextConfig

    from persian_qlora.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
    )
    if name == "gemma-3-1b":
        dims = dict(GEMMA3_1B, num_hidden_layers=layers or 26)
        pattern = ["sliding_attention"] * 5 + ["full_attention"]
        dims["layer_types"] = [pattern[i % 6] for i in range(dims["num_hidden_layers"])]
        config, model_class = Gemma3TextConfig(**dims, **ids), Gemma3ForCausalLM
    else:  # the whole multimodal checkpoint, in the hub's layout, as users get google/gemma-3n-E4B-it
        from realsize_memory import e4b_config

        config, model_class = e4b_config(layers), Gemma3nForConditionalGeneration
        config.text_config.update(ids)
        if layers:  # keep the published proportion of KV-sharing layers roughly
            config.text_config.num_kv_shared_layers = layers // 2
    config.get_text_config().tie_word_embeddings = True
    # The tiny tokenizer has Gemma's special-token ids; the rest of the 262k vocabulary is simply never read here.
    torch.manual_seed(0)
    model = model_class._from_config(config, dtype=torch.bfloat16)  # on the CPU, in bf16 from the start
    model.save_pretrained(path, max_shard_size="2GB")
    tokenizer.save_pretrained(path)
    del model


def worker(path: Path, method: str, tokens: int, steps: int) -> dict:
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from persian_qlora import PersianChatDataset
    from persian_qlora.measure import PhaseMeter
    from persian_qlora.modeling import build_lora_model, build_qlora_model, resolve_dtype
    from persian_qlora.testing import chained_conversations
    from persian_qlora.training import TrainConfig, make_trainer

    tokenizer = AutoTokenizer.from_pretrained(path)
    records = chained_conversations(tokenizer, [tokens] * (2 * steps))
    dataset = PersianChatDataset(records, tokenizer, max_length=tokens)
    builder = build_qlora_model if method == "qlora" else build_lora_model
    bf16 = resolve_dtype() == torch.bfloat16
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with PhaseMeter(device) as load:  # from before the load: what the load puts on the GPU counts too
        model = builder(str(path))  # text-only from the multimodal E4B; bf16 compute on a GPU with native bf16

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    step_times = StepTimes()
    extra = {"bf16": bf16, "save_strategy": "no", "disable_tqdm": True, "train_sampling_strategy": "sequential"}
    config = TrainConfig(
        output_dir=str(path.parent / f"run-{method}"),
        gradient_accumulation_steps=1,
        max_steps=steps,
        warmup_steps=0,
        extra=extra,
    )
    trainer = make_trainer(model, tokenizer, dataset, config=config, callbacks=[step_times])
    with PhaseMeter(device) as train:  # resets the peak, but the loaded model is still held: the higher peak counts
        start = time.perf_counter()
        trainer.train()
    marks = [start, *step_times.times]
    timed = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]  # step 1 is a warm-up
    seconds = sum(timed) / len(timed)
    real = sum(len(dataset[i]["input_ids"]) for i in range(len(dataset))) / steps
    peaks = ("cuda_max_allocated_gb", "cuda_max_reserved_gb", "cpu_peak_rss_gb")
    memory = {key: max(load.result.memory[key], train.result.memory[key]) for key in peaks if key in load.result.memory}
    return {
        "seconds_per_step": seconds,
        "tokens_per_second": real / seconds,
        "memory": memory,  # the higher of the load's and training's peaks
        "load_memory": load.result.memory,
        "train_memory": train.result.memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per conversation (batch of 2)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps, the first untimed")
    parser.add_argument("--smoke", action="store_true", help="a CPU check of this script: 2 layers, 128 tokens")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        path, method = Path(args.worker[0]), args.worker[1]
        args.result.write_text(json.dumps(worker(path, method, args.tokens, args.steps)))
        return

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("no CUDA GPU: these figures mean something only on one (use --smoke to check the script on CPU)")
    if args.smoke:
        args.tokens, args.steps = 128, 3
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-scale-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run: not real figures)"
    print(f"device: {device}; torch {torch.__version__}; batch 2 x {args.tokens} tokens, {args.steps} steps\n")
    print(
        "| model | method | peak allocated, load and training (GB) | of which the load (GB) | peak reserved (GB) "
        "| tokens/s | s per optimizer step |"
    )
    print("|---|---|---|---|---|---|---|")
    results: dict[str, dict] = {}
    for name in args.models:
        path = workdir / name / "model"
        if not (path / "config.json").exists():
            build(name, path, 2 if args.smoke else None)
        for method in METHODS:
            result_file = workdir / name / f"{method}.json"
            command = [sys.executable, __file__, "--worker", str(path), method, "--result", str(result_file)]
            subprocess.run([*command, "--tokens", str(args.tokens), "--steps", str(args.steps)], check=True)
            r = results[f"{name} {method}"] = json.loads(result_file.read_text())
            memory = r["memory"]
            key = "cuda_max_allocated_gb" if "cuda_max_allocated_gb" in memory else "cpu_peak_rss_gb"
            reserved = memory.get("cuda_max_reserved_gb", float("nan"))
            print(
                f"| {name} | {method} | {memory[key]:.2f} | {r['load_memory'][key]:.2f} | {reserved:.2f} "
                f"| {r['tokens_per_second']:.0f} | {r['seconds_per_step']:.2f} |"
            )
    for name in args.models:
        qlora, lora = results[f"{name} qlora"], results[f"{name} lora"]
        print(f"- {name}: QLoRA tokens/s = x{qlora['tokens_per_second'] / lora['tokens_per_second']:.2f} LoRA's")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
