"""Load Persian chat data, tokenize it with Gemma turn masking, and collate a training batch.

python examples/prepare_data.py                          # bundled corpus, offline tiny tokenizer
python examples/prepare_data.py --tokenizer google/gemma-3-1b-it --data mshojaei77/persian-gk
"""

import argparse

from transformers import AutoTokenizer

from persian_qlora import GemmaChatCollator, PersianChatDataset, bundled_corpus_path
from persian_qlora.testing import build_tiny_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--tokenizer", help="a Gemma 3 / 3n tokenizer (default: the tiny offline one)")
parser.add_argument("--data", default=str(bundled_corpus_path("train")), help="hub name or local file")
parser.add_argument("--max-length", type=int, default=4000)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else build_tiny_tokenizer()

# Validation, cleaning and Persian normalisation happen here; bad records are skipped and counted.
dataset = PersianChatDataset(args.data, tokenizer, max_length=args.max_length, on_error="skip")
print(dataset.stats)

# The collator pads on the right; labels are -100 except model turns (content + <end_of_turn>).
collator = GemmaChatCollator(tokenizer, pad_to_multiple_of=8)
batch = collator([dataset[0], dataset[1]])
for name, tensor in batch.items():
    print(f"{name:<15} {tuple(tensor.shape)}")

trained = batch["labels"][0][batch["labels"][0] != -100]
print("first example's trained tokens:", tokenizer.decode(trained))
