"""Chat with a fine-tuned model in the terminal, streaming the reply (what `persian-qlora chat` does).

python examples/chat.py merged/gemma3-fa                    # a merged model
python examples/chat.py google/gemma-3-1b-it --adapter runs/qlora --quantization 4bit
"""

import argparse

from persian_qlora import ChatSession, load_for_inference

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--adapter")
parser.add_argument("--quantization", choices=["8bit", "4bit"])
args = parser.parse_args()

model, tokenizer = load_for_inference(args.model, args.adapter, quantization=args.quantization)
# Sampling defaults are the reference's: temperature 0.1, top_p 0.95, top_k 64.
session = ChatSession(model, tokenizer, system="تو یک دستیار فارسی‌زبان مفید هستی.")

while (text := input("شما> ").strip()) != "/exit":
    if text == "/reset":
        session.reset()
        continue
    for piece in session.send(text):
        print(piece, end="", flush=True)
    print()
