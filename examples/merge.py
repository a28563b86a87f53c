"""Merge a trained adapter into a standalone bf16 model (the whole base checkpoint), and check it against base +
adapter.

python examples/merge.py runs/qlora merged/qlora-nf4 --merge-base nf4
"""

import argparse
import json
from pathlib import Path

from persian_qlora import merge_to_fp16

parser = argparse.ArgumentParser()
parser.add_argument("adapter", type=Path)
parser.add_argument("output", type=Path)
parser.add_argument("--merge-base", choices=["original", "nf4"], default="original")
args = parser.parse_args()

# The adapter remembers its base model; metrics.json (written by training) goes into the model card.
base = json.loads((args.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
metrics_file = args.adapter / "metrics.json"
metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
card_metrics = {k: metrics[k] for k in ("final_loss", "trained_tokens_per_second") if metrics.get(k) is not None}

result = merge_to_fp16(
    base,
    args.adapter,
    args.output,
    merge_base=args.merge_base,  # "nf4": the weights a QLoRA adapter was trained against
    max_shard_size="2GB",
    verify=True,  # re-read every tensor, then compare the merged model's logits with base + adapter
    metrics=card_metrics,
)
print(f"merged model in {result.output_dir}; max |logit difference| = {result.max_abs_logit_diff:.2e}")
