"""The reference inference table: one prompt, and a batch of 4, each to 256 new tokens, for every way of loading.

Loadings: the merged model (bf16 on a GPU, fp32 on CPU), base + adapter (unmerged LoRA), and the merged model in
8-bit and 4-bit. Each scenario runs once to warm up, then is timed; every run generates exactly 256 new tokens
(`min_new_tokens`), so tokens/s compare like with like. Batch tokens/s are aggregated over the 4 replies.

    python benchmarks/inference.py                          # tiny Gemma 3 built here, CPU
    python benchmarks/inference.py --base B --adapter A --merged M   # your own models (on a GPU)
"""

import argparse
import tempfile
from pathlib import Path

import torch

from persian_qlora import PersianChatDataset, evaluation_pairs, generate, load_for_inference, merge_to_fp16

parser = argparse.ArgumentParser()
parser.add_argument("--base", help="base model (default: a tiny Gemma 3 with a random LoRA adapter, built here)")
parser.add_argument("--adapter")
parser.add_argument("--merged")
parser.add_argument("--new-tokens", type=int, default=256)
args = parser.parse_args()

workdir = Path(tempfile.mkdtemp())
if args.base is None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from persian_qlora.testing import DEMO_DIMS, build_tiny_gemma

    args.base = str(build_tiny_gemma(workdir / "base", **DEMO_DIMS))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)  # non-zero B: real work
    get_peft_model(AutoModelForCausalLM.from_pretrained(args.base), lora).save_pretrained(workdir / "adapter")
    args.adapter = str(workdir / "adapter")
    args.merged = str(merge_to_fp16(args.base, args.adapter, workdir / "merged", dtype=torch.bfloat16).output_dir)

loadings = {
    "merged": dict(model=args.merged),
    "base + adapter": dict(model=args.base, adapter=args.adapter),
    "merged, 8-bit": dict(model=args.merged, load_in="8bit"),
    "merged, 4-bit": dict(model=args.merged, load_in="4bit"),
}
device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
print(f"device: {device}; torch {torch.__version__}; {args.new_tokens} new tokens per reply\n")
print("| loading | dtype | scenario | seconds | tokens/s | peak memory (GB) |")
print("|---|---|---|---|---|---|")
for name, kwargs in loadings.items():
    model, tokenizer = load_for_inference(**kwargs)
    prompts = evaluation_pairs(PersianChatDataset.bundled(tokenizer, "test").conversations[:4])[0]
    for scenario, batch in (("single prompt", prompts[:1]), ("batch of 4", prompts)):
        settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=len(batch))
        generate(model, tokenizer, batch, **settings)  # warm-up
        result = generate(model, tokenizer, batch, **settings)
        memory = result.memory.get("cuda_max_allocated_gb", result.memory.get("cpu_peak_rss_gb"))
        print(
            f"| {name} | {model.dtype} | {scenario} | {result.seconds:.2f} | {result.tokens_per_second:.1f} "
            f"| {memory:.2f} |"
        )
    del model
