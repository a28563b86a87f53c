"""Which end-of-turn fix makes a fine-tuned base model end its turn: the real Gemma 3 270M (the gemma3-270m extra),
QLoRA on the first conversations of the bundled train split, greedy replies to the first test prompts.

Variants: the adapter trained with and without the <end_of_turn> row (LoraSettings.train_turn_end), each decoded
with and without suppressing never-trained tokens (generate(suppress_untrained=...)). Prints, per variant, how
many replies ended their turn before the token limit and their lengths; --output writes the figures and replies.
Greedy replies can miss the end of turn for reasons of their own (a reply that wanders never reaches a point to
stop), so it also prints the teacher-forced measure: fed each test conversation whole, the rank of <end_of_turn>
among all tokens right after the reference reply's last token (1: greedy decoding would end the turn there), with
and without the never-trained tokens.

    python benchmarks/turn_end.py --steps 24 --train 12 --test 12 --output turn_end.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def turn_end_ranks(model, tokenizer, conversations, suppressed: list[int]) -> tuple[list[int], list[int]]:
    """Per conversation: the rank of <end_of_turn> where its last model turn ends, among all tokens and among the
    tokens suppression leaves."""
    import torch

    from persian_qlora.families import GEMMA3_TURNS

    eot = tokenizer.convert_tokens_to_ids(GEMMA3_TURNS.end_of_turn)
    ranks, ranks_suppressed = [], []
    model.eval()
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]
        end = max(i for i, t in enumerate(ids) if t == eot)  # the last model turn's <end_of_turn>
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:end]])).logits[0, -1].float()
        ranks.append(int((logits > logits[eot]).sum()) + 1)
        logits[suppressed] = float("-inf")
        ranks_suppressed.append(int((logits > logits[eot]).sum()) + 1)
    return ranks, ranks_suppressed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of batch 2, no accumulation")
    parser.add_argument("--train", type=int, default=12, help="training conversations (the first of the split)")
    parser.add_argument("--test", type=int, default=12, help="test prompts (the first of the split)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer, set_seed

    from persian_qlora.bases import prepare_base
    from persian_qlora.dataset import PersianChatDataset
    from persian_qlora.families import GEMMA3_TURNS
    from persian_qlora.generation import evaluation_pairs, generate
    from persian_qlora.modeling import LoraSettings, build_qlora_model
    from persian_qlora.tokens import indistinct_tokens, untrained_token_ids
    from persian_qlora.training import TrainConfig, make_trainer

    path = str(prepare_base("gemma3-270m"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = PersianChatDataset.bundled(tokenizer, split="train", max_length=512)
    test = PersianChatDataset.bundled(tokenizer, split="test", max_length=512)
    prompts, _ = evaluation_pairs(test.conversations[: args.test])
    suppressed = untrained_token_ids(tokenizer)
    results: dict[str, dict] = {}
    for train_turn_end in (False, True):
        set_seed(3407)
        model = build_qlora_model(path, lora=LoraSettings(train_turn_end=train_turn_end))
        if not train_turn_end:  # once: why the fix is needed on this checkpoint
            eot = tokenizer.convert_tokens_to_ids(GEMMA3_TURNS.end_of_turn)
            embedding = model.get_input_embeddings().weight
            print(
                f"{GEMMA3_TURNS.end_of_turn} indistinct: {bool(indistinct_tokens(embedding, [eot]))}; "
                f"never-trained ids: {len(untrained_token_ids(tokenizer))}",
                flush=True,
            )
        config = TrainConfig(
            output_dir=f"/tmp/turn-end-{train_turn_end}",
            learning_rate=2e-4,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            warmup_steps=2,
            max_length=512,
            extra={"save_strategy": "no", "disable_tqdm": True},
        )
        started = time.perf_counter()
        trainer = make_trainer(model, tokenizer, [train[i] for i in range(args.train)], config=config)
        trainer.train()
        losses = [round(e["loss"], 2) for e in trainer.state.log_history if "loss" in e]
        print(
            f"train_turn_end={train_turn_end}: {time.perf_counter() - started:.0f} s, loss {losses[0]} -> {losses[-1]}",
            flush=True,
        )
        ranks, ranks_suppressed = turn_end_ranks(model, tokenizer, test.conversations[: args.test], suppressed)
        print(
            f"train_turn_end={train_turn_end}: rank of {GEMMA3_TURNS.end_of_turn} at the reference's turn end "
            f"{ranks}; with never-trained tokens suppressed {ranks_suppressed}",
            flush=True,
        )
        for suppress in (False, True):
            result = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=args.max_new_tokens,
                batch_size=12,
                suppress_untrained=suppress,
            )
            name = f"train_turn_end={train_turn_end}, suppress_untrained={suppress}"
            ended = sum(result.ended_turn)
            results[name] = {
                "ended_turn": ended,
                "replies": len(prompts),
                "new_tokens": result.new_tokens,
                "texts": result.texts,
                "final_loss": losses[-1],
                "turn_end_ranks": ranks_suppressed if suppress else ranks,
            }
            print(f"{name}: {ended}/{len(prompts)} ended their turn; new tokens {result.new_tokens}", flush=True)
        del model, trainer
    if args.output:
        args.output.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
