"""The GGUF types of `export_gguf` on the real Gemma 3 270M, inside llama.cpp: file size, what the file holds,
perplexity on Persian replies and generation speed on this CPU.

For each type the prepared Gemma 3 270M (the gemma3-270m extra) is exported (the k-quants through llama.cpp's own
quantizer: the llama extra), then loaded in llama.cpp (llama-cpp-python) with its default kernels, as a user gets it:

  size        the file's size, and how many weights of each GGML type it holds (norms are F32 in every file);
  perplexity  exp of the mean negative log-likelihood of the model-turn tokens (what training scores: reply text
              and <end_of_turn>) of the first --conversations conversations of the bundled test split (49 in all),
              from llama.cpp's logits with every earlier token of the conversation as context; prompt tokens/s is
              that pass's speed (every position projected onto the 262,144-token vocabulary);
  generation  greedy decoding of --new-tokens tokens after the first test prompt, <end_of_turn> and <eos>
              suppressed so that every run decodes as many, one token per step; the median of --repeats rounds,
              each round running every type once, so that a shared machine's changing load falls on all alike.

    nice python benchmarks/gguf_types.py --workdir /tmp/gguf-types > gguf_types.txt
    nice python benchmarks/gguf_types.py --workdir /tmp/gguf-types --reuse --speed-only --repeats 5

The files go under --workdir (about 1.6 GB for all seven). `--plain-kernels` loads with llama.cpp's plain CPU kernels
(no extra buffer types), as the tests do because llama-cpp-python 0.3.36's Intel AMX kernel crashes on Q8_0 files.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import torch
from transformers import AutoTokenizer

from persian_qlora import PersianChatDataset, evaluation_pairs, export_gguf
from persian_qlora.bases import prepare_base
from persian_qlora.masking import IGNORE_INDEX

TYPES = ("bf16", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")

parser = argparse.ArgumentParser()
parser.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
parser.add_argument("--workdir", type=Path, default=Path("/tmp/gguf-types"))
parser.add_argument("--threads", type=int, default=os.cpu_count())
parser.add_argument("--new-tokens", type=int, default=64)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--conversations", type=int, default=49, help="the first N test conversations for perplexity")
parser.add_argument("--reuse", action="store_true", help="keep the files already in --workdir (no export)")
parser.add_argument("--speed-only", action="store_true", help="no perplexity: generation speed alone")
parser.add_argument("--plain-kernels", action="store_true", help="llama.cpp's plain CPU kernels (no AMX, no repack)")
args = parser.parse_args()


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
        if line.startswith("model name")
    ]
    return names[0] if names else platform.machine()


def load(path: Path, **kwargs) -> llama_cpp.Llama:
    if args.plain_kernels:  # Llama() takes no such argument; it reads llama_model_default_params()
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def plain():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = plain
        try:
            return llama_cpp.Llama(model_path=str(path), n_threads=args.threads, verbose=False, **kwargs)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults
    return llama_cpp.Llama(model_path=str(path), n_threads=args.threads, verbose=False, **kwargs)


def reply_perplexity(path: Path, dataset) -> tuple[float, float]:
    """Perplexity of the model-turn tokens, and the prompt-processing speed in tokens/s."""
    longest = max(len(item["input_ids"]) for item in dataset)
    llm = load(path, n_ctx=longest, n_batch=longest, logits_all=True)
    nll, scored, evaluated, seconds = 0.0, 0, 0, 0.0
    for item in dataset:
        ids, labels = list(item["input_ids"]), np.array(item["labels"])
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        seconds += time.perf_counter() - start
        evaluated += len(ids)
        targets = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # position t predicts token t + 1
        logits = torch.from_numpy(np.asarray(llm.scores[targets], dtype=np.float32))
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])[targets], reduction="sum"))
        scored += len(targets)
    llm.close()
    return math.exp(nll / scored), evaluated / seconds


def decode_speed(llm: llama_cpp.Llama, prompt: list[int], never: list[int]) -> float:
    """Decoded tokens/s of one greedy generation, the prompt's processing excluded."""

    def suppress(input_ids, scores):
        scores[never] = -np.inf
        return scores

    llm.reset()
    stamps = []
    for _token in llm.generate(prompt, top_k=1, temp=0.0, logits_processor=[suppress]):
        stamps.append(time.perf_counter())  # the first after the prompt's pass and one decoding step
        if len(stamps) == args.new_tokens + 1:
            break
    return args.new_tokens / (stamps[-1] - stamps[0])


model = prepare_base("gemma3-270m")
tokenizer = AutoTokenizer.from_pretrained(model)
dataset = PersianChatDataset.bundled(tokenizer, split="test")
scored_conversations = [dataset[i] for i in range(min(args.conversations, len(dataset)))]
prompt_messages = evaluation_pairs(dataset.conversations[:1])[0][0]
prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, return_dict=True)["input_ids"]
never = [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id]
args.workdir.mkdir(parents=True, exist_ok=True)
print(
    f"Gemma 3 270M ({model}); llama-cpp-python {llama_cpp.__version__}; {cpu_name()}, "
    f"{args.threads} threads, {'plain' if args.plain_kernels else 'default'} kernels; load average at start "
    f"{os.getloadavg()[0]:.1f}; perplexity over {len(scored_conversations)} test conversations; generation "
    f"{args.new_tokens} new tokens x {args.repeats}\n",
    flush=True,
)
rows = {}
for quantization in args.types:
    path = args.workdir / f"gemma3-270m.{quantization}.gguf"
    start = time.perf_counter()
    if not (args.reuse and path.is_file()):
        export_gguf(model, path, quantization=quantization, overwrite=True)
    exported = time.perf_counter() - start
    held = Counter()
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) > 1:  # the norms are F32 in every file
            held[tensor.tensor_type.name] += int(tensor.n_elements)
    total = sum(held.values())
    holds = ", ".join(f"{kind} {count / total:.1%}" for kind, count in held.most_common())
    ppl, prompt_speed = (math.nan, math.nan) if args.speed_only else reply_perplexity(path, scored_conversations)
    rows[quantization] = [path.stat().st_size, holds, ppl, prompt_speed]
    print(
        f"{quantization}: {path.stat().st_size:,} bytes, export {exported:.1f} s; holds {holds}; perplexity "
        f"{ppl:.4f}; prompt {prompt_speed:.0f} tokens/s; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )

# Generation in rounds, each type once per round, so that the machine's changing load falls on every type alike.
models = {q: load(args.workdir / f"gemma3-270m.{q}.gguf", n_ctx=len(prompt) + args.new_tokens + 8) for q in rows}
speeds = {q: [] for q in rows}
for round_ in range(args.repeats):
    for quantization, llm in models.items():
        speeds[quantization].append(decode_speed(llm, prompt, never))
    print(f"round {round_ + 1}: " + ", ".join(f"{q} {v[-1]:.1f}" for q, v in speeds.items()), flush=True)

print(
    "\n| type | file (MiB) | weight matrices held as (share of their weights) | perplexity, Persian replies "
    "| prompt tokens/s | generation tokens/s (median) |"
)
print("|---|---|---|---|---|---|")
for quantization, (size, holds, ppl, prompt_speed) in rows.items():
    speed = statistics.median(speeds[quantization])
    print(f"| {quantization} | {size / 2**20:.1f} | {holds} | {ppl:.3f} | {prompt_speed:.0f} | {speed:.1f} |")
print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
