"""QLoRA against LoRA against the untouched base: train both, evaluate before and after, write a report.

python examples/compare_qlora_lora.py --tiny     # offline, CPU: tiny Persian base + bundled corpus (minutes)
python examples/compare_qlora_lora.py --model google/gemma-3-1b-it --max-eval 100
"""

import argparse

from persian_qlora.compare import CompareConfig, compare, demo_config
from persian_qlora.report import table_lines
from persian_qlora.training import RunConfig

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="google/gemma-3-1b-it")
parser.add_argument("--data", default="mshojaei77/persian-gk")
parser.add_argument("--test-data", help="held-out conversations (default: the 'test' split of --data)")
parser.add_argument("--max-eval", type=int, default=100)
parser.add_argument("--output-dir", default="runs/compare")
parser.add_argument("--tiny", action="store_true")
args = parser.parse_args()

if args.tiny:
    # The offline demo's settings (what `persian-qlora demo` runs).
    config = demo_config(args.output_dir)
else:
    # The reference recipe for both runs; they differ only in the base's quantisation.
    config = CompareConfig(
        run=RunConfig.load(None, {"model": args.model, "data": args.data}),
        output_dir=args.output_dir,
        test_data=args.test_data,
        max_eval=args.max_eval,
        merge_methods=("qlora", "lora"),  # evaluate both merged fp16 models as well
    )

report = compare(config)  # each method runs in its own process; report.md/json and charts are written
print("\n".join(table_lines(report)))
print(f"full report: {config.output_dir}/report.md")
