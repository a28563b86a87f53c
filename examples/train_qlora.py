"""QLoRA fine-tuning, composed from the pieces: dataset, 4-bit model with LoRA, trainer.

python examples/train_qlora.py --tiny            # offline: tiny random Gemma 3 + bundled corpus, CPU
python examples/train_qlora.py                   # google/gemma-3-1b-it on mshojaei77/persian-gk (GPU)
"""

import argparse
import tempfile

from transformers import AutoTokenizer

from persian_qlora import PersianChatDataset, TrainConfig, build_qlora_model, bundled_corpus_path, make_trainer
from persian_qlora.testing import build_tiny_gemma

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="google/gemma-3-1b-it")
parser.add_argument("--data", default="mshojaei77/persian-gk")
parser.add_argument("--output-dir", default="runs/qlora")
parser.add_argument("--tiny", action="store_true", help="offline demo on a tiny random Gemma 3")
args = parser.parse_args()

model_path, data = args.model, args.data
if args.tiny:
    model_path = str(build_tiny_gemma(tempfile.mkdtemp(), "gemma3"))
    data = bundled_corpus_path("train")

tokenizer = AutoTokenizer.from_pretrained(model_path)
train = PersianChatDataset(data, tokenizer, max_length=4000, on_error="skip")
print(train.stats)

# NF4 + double quantisation, LoRA r=8/alpha=16 on q,k,v,o,gate,up,down of the language layers only.
model = build_qlora_model(model_path)
model.print_trainable_parameters()

# The reference recipe: AdamW 8-bit, lr 2e-5 linear, warmup 10, batch 2 x 4, 1 epoch, seed 3407.
config = TrainConfig(output_dir=args.output_dir, max_steps=10 if args.tiny else -1)
trainer = make_trainer(model, tokenizer, train, config=config)
trainer.train()
trainer.save_model()  # adapter (safetensors) + tokenizer; metrics.json and charts are already there
print(f"adapter saved to {args.output_dir}; run metrics: {trainer.run_metrics.summary(trainer.state)['memory']}")
