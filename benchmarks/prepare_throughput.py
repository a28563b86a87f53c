"""Conversations per second for validation + cleaning + tokenization + masking (PersianChatDataset construction).

The corpus is the bundled one repeated to 6,000 conversations, the size of mshojaei77/persian-gk. Each repeat
gets a distinct system prompt so deduplication keeps every conversation. Run: python benchmarks/prepare_throughput.py
"""

import argparse
import json
import time

from persian_qlora import PersianChatDataset, bundled_corpus_path
from persian_qlora.testing import build_tiny_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--conversations", type=int, default=6000)
parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
args = parser.parse_args()

base = [json.loads(line) for line in bundled_corpus_path("train").read_text(encoding="utf-8").splitlines()]
records = []
while len(records) < args.conversations:
    copy = len(records) // len(base)
    for record in base[: args.conversations - len(records)]:
        records.append({"messages": [{"role": "system", "content": f"نسخهٔ {copy}"}, *record["messages"]]})

tokenizer = build_tiny_tokenizer()
timings = []
for _ in range(args.repeats):
    start = time.perf_counter()
    dataset = PersianChatDataset(records, tokenizer)
    timings.append(time.perf_counter() - start)
assert len(dataset) == args.conversations, dataset.stats

best = min(timings)
print(f"conversations          {len(dataset)}")
print(f"tokens                 {sum(dataset.stats.token_lengths)}")
print(f"best of {args.repeats} runs          {best:.2f} s")
print(f"conversations/s        {len(dataset) / best:,.0f}")
print(f"tokens/s               {sum(dataset.stats.token_lengths) / best:,.0f}")
