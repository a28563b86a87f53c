"""Chat with a fine-tuned model in the terminal, streaming the reply (what `persian-qlora chat` does).

python examples/chat.py merged/gemma3-fa                    # a merged model
python examples/chat.py google/gemma-3-1b-it --adapter runs/qlora --load-in 4bit
"""

import argparse

from persian_qlora import ChatSession, load_for_inference
from persian_qlora.cli import chat_loop

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--adapter")
parser.add_argument("--load-in", choices=["8bit", "4bit"])
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

model, tokenizer = load_for_inference(args.model, args.adapter, load_in=args.load_in)
# Sampling defaults are the reference's: temperature 0.1, top_p 0.95, top_k 64.
session = ChatSession(model, tokenizer, system="تو یک دستیار فارسی‌زبان مفید هستی.", max_new_tokens=args.max_new_tokens)
# The command's own loop: /reset and /exit, end of input, empty lines skipped, UTF-8 output on any locale.
chat_loop(session)
