"""QLoRA against LoRA against the untouched base: train both, evaluate before and after, write a report.

python examples/compare_qlora_lora.py --tiny     # offline, CPU: tiny Persian base + bundled corpus (minutes)
python examples/compare_qlora_lora.py --model google/gemma-3-1b-it --max-eval 100
"""

import argparse

from persian_qlora import CompareConfig, RunConfig, compare, demo_config

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="google/gemma-3-1b-it")
parser.add_argument("--data", default="mshojaei77/persian-gk")
parser.add_argument("--test-data", help="held-out conversations (default: the 'test' split of --data)")
parser.add_argument("--max-eval", type=int, default=100)
parser.add_argument("--max-new-tokens", type=int, help="cap each generated reply")
parser.add_argument("--max-steps", type=int, help="stop each run after this many updates (a smoke run)")
parser.add_argument("--output-dir", default="runs/compare")
parser.add_argument("--tiny", action="store_true")
args = parser.parse_args()

overrides = {"max_steps": args.max_steps} if args.max_steps else {}
if args.tiny:
    # The offline demo's settings (what `persian-qlora demo` runs).
    config = demo_config(args.output_dir, overrides=overrides)
    config.max_eval = args.max_eval
else:
    # The reference recipe for both runs; they differ only in the base's quantisation.
    config = CompareConfig(
        run=RunConfig.load(None, {"model": args.model, "data": args.data, **overrides}),
        output_dir=args.output_dir,
        test_data=args.test_data,
        max_eval=args.max_eval,
        merge_methods=("qlora", "lora"),  # evaluate both merged bf16 models as well
    )
if args.max_new_tokens is not None:
    config.max_new_tokens = args.max_new_tokens

report = compare(config)  # each method runs in its own process; report.md/json and charts are written
for run in report["runs"]:
    before, after = run["before"], run["after"]
    print(
        f"{run['method']}: BLEU-4 {before['bleu']:.2f} -> {after['bleu']:.2f}, "
        f"ROUGE-L {before['rouge_l']:.2f} -> {after['rouge_l']:.2f}, chrF {before['chrf']:.2f} -> {after['chrf']:.2f}"
    )
print(f"full report: {config.output_dir}/report.md")
