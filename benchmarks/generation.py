"""Evaluation generation: batched, length-sorted `generate` against a per-sample loop, on the bundled test split.

Greedy decoding, so the replies must be the same text either way; the script checks that and prints the speed-up.
The model is the offline demo's base (a tiny Gemma 3 pretrained here on the train split's Persian text, about 30 s
to build), so replies stop at different lengths as real ones do; or pass your own with --model.

    python benchmarks/generation.py
    python benchmarks/generation.py --model path/to/merged --new-tokens 128
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from persian_qlora import PersianChatDataset, evaluation_pairs, generate, load_for_inference

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a model directory (default: the demo's tiny Persian LM, built here)")
parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per reply")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 49])
args = parser.parse_args()

if args.model is None:
    from persian_qlora.testing import build_tiny_persian_lm

    args.model = str(build_tiny_persian_lm(Path(tempfile.mkdtemp()) / "tiny-persian-lm"))
model, tokenizer = load_for_inference(args.model)
prompts = evaluation_pairs(PersianChatDataset.bundled(tokenizer, "test").conversations)[0]
device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
print(f"device: {device}; torch {torch.__version__}; {len(prompts)} test prompts, up to {args.new_tokens} new tokens\n")

generate(model, tokenizer, prompts[:2], max_new_tokens=8)  # warm-up
runs = {"per-sample loop": dict(batch_size=1)}
for size in args.batch_sizes:
    runs[f"batched {size}, length-sorted"] = dict(batch_size=size)
    runs[f"batched {size}, length-sorted, static cache"] = dict(batch_size=size, cache_implementation="static")
results = {name: generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, **kw) for name, kw in runs.items()}

loop = results["per-sample loop"]
print("| generation | seconds | new tokens/s | speed-up | same replies as the loop |")
print("|---|---|---|---|---|")
for name, result in results.items():
    same = sum(a == b for a, b in zip(result.texts, loop.texts, strict=True))
    print(
        f"| {name} | {result.seconds:.1f} | {result.tokens_per_second:.0f} | x{loop.seconds / result.seconds:.1f} "
        f"| {same}/{len(prompts)} |"
    )
