"""The full-epoch real-model result of docs/results.md: Gemma 3 270M (the gemma3-270m extra), QLoRA against LoRA
with the same settings over the whole bundled train split, the learning rate chosen first on a validation slice of
that split (never on the test split), then evaluated on the bundled test split: both merge bases, perplexity, the
behaviour measures, BLEU-4, ROUGE-L, chrF, peak memory and time.

1. Learning rate: for each candidate, LoRA (``--sweep-method``; faster than QLoRA on a CPU, where bitsandbytes
   dequantises every weight at every use) trains on the train split less a validation slice (``eval_fraction`` of
   it, drawn with the recipe's seed) under the full epoch's schedule, stops after ``--sweep-updates`` updates (all
   of them with 0), and records the held-out loss every ``eval_steps`` updates; the candidate with the lowest
   final validation loss wins. Written to ``OUTPUT_DIR/lr_sweep.json``.
2. ``compare`` with that learning rate on the whole train split; ``OUTPUT_DIR/compare/report.md`` and
   ``report.json``. Every other setting is the reference recipe's, except ``--max-length`` (512 keeps all but 12
   of the 269 training conversations whole; the recipe's 4000 makes one epoch about four hours on 2 CPU cores).

    python benchmarks/real_model_result.py --output-dir runs/real-result
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/real-result"))
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[2e-5, 2e-4, 1e-3])
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--sweep-updates", type=int, default=10, help="stop each candidate here; 0: a whole epoch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sweep-method", choices=["qlora", "lora"], default="lora")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="64: the 49 test prompts in one batch")
    parser.add_argument("--learning-rate", type=float, help="skip the sweep and use this learning rate")
    args = parser.parse_args()

    from transformers import TrainerCallback

    from persian_qlora.bases import KNOWN_BASES, prepare_base
    from persian_qlora.compare import CompareConfig, compare
    from persian_qlora.dataset import bundled_corpus_path
    from persian_qlora.training import RunConfig, run_training

    base = str(prepare_base("gemma3-270m"))
    data = str(bundled_corpus_path("train"))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    learning_rate = args.learning_rate

    class StopAfter(TrainerCallback):
        """Ends a candidate's run early without changing its schedule (warmup and decay stay the epoch's)."""

        def on_step_end(self, train_args, state, control, **kwargs):
            if args.sweep_updates and state.global_step >= args.sweep_updates:
                control.should_training_stop = True

    if learning_rate is None:
        sweep = []
        for candidate in args.learning_rates:
            output_dir = args.output_dir / f"sweep-lr{candidate:g}"
            config = RunConfig.load(
                None,
                {
                    "model": base,
                    "data": data,
                    "method": args.sweep_method,
                    "eval_fraction": args.validation_fraction,
                    "learning_rate": candidate,
                    "max_length": args.max_length,
                    "eval_steps": args.eval_steps,
                    "save_steps": args.eval_steps,
                    "save_strategy": "no",
                    "output_dir": str(output_dir),
                },
            )
            started = time.perf_counter()
            run_training(config, callbacks=[StopAfter()])
            metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
            row = {
                "learning_rate": candidate,
                "updates": metrics["global_step"],
                "eval_log": metrics["eval_log"],
                "final_eval_loss": metrics["eval_log"][-1]["eval_loss"],
                "seconds": round(time.perf_counter() - started, 1),
            }
            sweep.append(row)
            print(json.dumps(row), flush=True)
        learning_rate = min(sweep, key=lambda row: row["final_eval_loss"])["learning_rate"]
        (args.output_dir / "lr_sweep.json").write_text(
            json.dumps({"chosen": learning_rate, "candidates": sweep}, indent=1) + "\n", encoding="utf-8"
        )
        print(f"chosen learning rate: {learning_rate:g}", flush=True)

    config = CompareConfig(
        run=RunConfig.load(
            None,
            {
                "model": base,
                "data": data,
                "learning_rate": learning_rate,
                "max_length": args.max_length,
                "save_strategy": "no",
            },
        ),
        output_dir=str(args.output_dir / "compare"),
        test_data=str(bundled_corpus_path("test")),
        max_new_tokens=args.max_new_tokens,
        eval_batch_size=args.eval_batch_size,
        merge_bases=("original", "nf4"),
        perplexity=True,
        model_label=KNOWN_BASES["gemma3-270m"].description,
    )
    started = time.perf_counter()
    compare(config)
    print(f"compare: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
