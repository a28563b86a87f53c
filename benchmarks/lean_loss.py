"""The lean loss's two paths against the plain loss and TRL's: one forward and backward at Gemma's vocabulary.

A frozen, bias-free LM head takes the fused path: each chunk's input gradient is computed in the forward pass
(two head matmuls per chunk). Any other head recomputes each chunk in the backward pass (three); here that path is
reached with the same frozen weight behind a wrapper module, as a peft-wrapped head would be. The plain loss
projects every row at once. ``trl`` is TRL's chunked log-probability function as its SFTTrainer calls it on a device
without Triton (a CPU): 4096 rows by 32,768 vocabulary columns at a time, with the entropy and top-1 statistics it
logs, each tile recomputed in the backward pass. Each path runs in a fresh process; its time is the best of
``--repeats`` runs (wall-clock, and CPU time over all threads, which a busy machine moves less), its memory the
process's peak RSS over them.

``--trained-rows N`` wraps the head in peft's trainable token rows (``trainable_token_indices``), as the defaults
do on a pretrained base to train ``<end_of_turn>``: the fused path replaces those rows and computes their gradient;
the plain loss is peft's own forward (the whole weight with the rows written in, then all logits); TRL reads that
same merged weight (``lm_head.weight``). The recomputing path is not run then.

    python benchmarks/lean_loss.py                       # 1,024 rows, hidden 256 (the throughput model's)
    python benchmarks/lean_loss.py --hidden 1152         # Gemma-3-1B's hidden size
    python benchmarks/lean_loss.py --trained-rows 1      # the defaults on a pretrained base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PATHS = ("fused", "recomputing", "plain", "trl")
VOCAB = 262_144
TURN_END_ID = 106  # <end_of_turn> in Gemma's vocabulary: the row the defaults train on a pretrained base


def worker(path: str, rows: int, hidden: int, repeats: int, trained_rows: int) -> dict:
    import time

    import torch

    from persian_qlora.loss import chunked_causal_lm_loss
    from persian_qlora.measure import PhaseMeter

    class Wrapped(torch.nn.Module):
        def __init__(self, linear: torch.nn.Module) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, VOCAB, bias=False).requires_grad_(False)
    if trained_rows:
        from peft.utils.other import TrainableTokensWrapper

        indices = [TURN_END_ID, *range(VOCAB - trained_rows + 1, VOCAB)]  # rows at both ends
        head = TrainableTokensWrapper(head, "default", token_indices=indices)
    states = torch.randn(1, rows + 1, hidden, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, rows + 1))

    def step() -> None:
        if path == "plain":
            logits = head(states[0, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:])
        elif path == "trl":
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

            outputs = ("entropy", "is_top1")  # what SFTTrainer asks its fused LM head for, besides log-probs
            log_probs, *_ = ChunkedLogProbFunction.apply(
                states[0, :-1], head.weight, None, labels[0, 1:], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs
            )
            loss = -log_probs.mean()
        else:
            loss = chunked_causal_lm_loss(states, labels, head if path == "fused" else Wrapped(head))
        loss.backward()
        states.grad = None

    times, cpu_times = [], []
    with PhaseMeter("cpu") as meter:
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    return {
        "path": path,
        "best_seconds": min(times),
        "seconds": times,
        "best_cpu_seconds": min(cpu_times),
        "peak_gb": meter.result.peak_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="labelled positions")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trained-rows", type=int, default=0, help="rows of the head trained by peft (0: frozen)")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.hidden, args.repeats, args.trained_rows)))
        return

    import torch

    rows_note = f"; {args.trained_rows} trained head rows (peft)" if args.trained_rows else "; frozen head"
    print(
        f"{args.rows} rows, hidden {args.hidden}, vocabulary {VOCAB}{rows_note}; CPU, {torch.get_num_threads()} threads"
    )
    print("\n| path | best seconds (forward + backward) | all runs | best CPU-seconds (all threads) | peak RSS (GB) |")
    print("|---|---|---|---|---|")
    results = {}
    for path in [p for p in PATHS if not (args.trained_rows and p == "recomputing")]:
        command = [sys.executable, __file__, "--worker", path, "--rows", str(args.rows)]
        command += ["--hidden", str(args.hidden), "--repeats", str(args.repeats)]
        command += ["--trained-rows", str(args.trained_rows)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        results[path] = result
        runs = ", ".join(f"{s:.2f}" for s in result["seconds"])
        print(
            f"| {path} | {result['best_seconds']:.2f} | {runs} | {result['best_cpu_seconds']:.2f} "
            f"| {result['peak_gb']:.2f} |"
        )
    fused, plain = results["fused"], results["plain"]
    print(
        f"\nfused against the plain loss: time x{fused['best_seconds'] / plain['best_seconds']:.2f}, "
        f"CPU time x{fused['best_cpu_seconds'] / plain['best_cpu_seconds']:.2f}, "
        f"peak memory x{fused['peak_gb'] / plain['peak_gb']:.2f} (targets: time <= 1.0, memory <= 0.25)"
    )
    if "recomputing" in results:
        speed_up = results["recomputing"]["best_seconds"] / fused["best_seconds"]
        print(f"fused against recomputing: x{speed_up:.2f} faster")


if __name__ == "__main__":
    main()
