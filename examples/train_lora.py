"""LoRA on a 16-bit base in one call, from a YAML-able RunConfig (what `persian-qlora train` runs).

python examples/train_lora.py --tiny             # offline: tiny random Gemma 3 + bundled corpus, CPU
python examples/train_lora.py --model google/gemma-3n-E4B-it
"""

import argparse

from persian_qlora import RunConfig, run_training

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="google/gemma-3-1b-it")
parser.add_argument("--data", default="mshojaei77/persian-gk")
parser.add_argument("--config", help="optional YAML file with any RunConfig/TrainingArguments keys")
parser.add_argument("--tiny", action="store_true", help="offline demo on a tiny random Gemma 3")
args = parser.parse_args()

overrides = {"method": "lora", "model": args.model, "data": args.data, "output_dir": "runs/lora"}
if args.tiny:
    overrides.update(tiny=True, max_steps=10)
config = RunConfig.load(args.config, overrides)
what = "a tiny random Gemma 3" if config.tiny else config.model
print(f"LoRA r={config.lora.r} alpha={config.lora.alpha} on {what}, lr {config.train.learning_rate}")

output = run_training(config)  # dataset -> build_lora_model -> make_trainer -> train -> save
print(f"adapter, tokenizer, metrics.json, loss.png and grad_norm.png are in {output}")
