"""The lean loss's two paths against the plain loss and TRL's: one forward and backward at Gemma's vocabulary.

A frozen, bias-free LM head takes the fused path: each chunk's input gradient is computed in the forward pass
(two head matmuls per chunk). Any other head recomputes each chunk in the backward pass (three); here that path is
reached with the same frozen weight behind a wrapper module, as a peft-wrapped head would be. The plain loss
projects every row at once. ``trl`` is TRL's chunked log-probability function as its SFTTrainer calls it on a device
without Triton (a CPU): 4096 rows by 32,768 vocabulary columns at a time, with the entropy and top-1 statistics it
logs, each tile recomputed in the backward pass. Each path runs in a fresh process; its time is the best of
``--repeats`` runs, its memory the process's peak RSS over them.

    python benchmarks/lean_loss.py                       # 1,024 rows, hidden 256 (the throughput model's)
    python benchmarks/lean_loss.py --hidden 1152         # Gemma-3-1B's hidden size
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PATHS = ("fused", "recomputing", "plain", "trl")
VOCAB = 262_144


def worker(path: str, rows: int, hidden: int, repeats: int) -> dict:
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

    times = []
    with PhaseMeter("cpu") as meter:
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return {"path": path, "best_seconds": min(times), "seconds": times, "peak_gb": meter.result.peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="labelled positions")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.hidden, args.repeats)))
        return

    import torch

    print(f"{args.rows} rows, hidden {args.hidden}, vocabulary {VOCAB}; CPU, {torch.get_num_threads()} threads")
    print("\n| path | best seconds (forward + backward) | all runs | peak RSS (GB) |")
    print("|---|---|---|---|")
    results = {}
    for path in PATHS:
        command = [sys.executable, __file__, "--worker", path, "--rows", str(args.rows)]
        command += ["--hidden", str(args.hidden), "--repeats", str(args.repeats)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        results[path] = result
        runs = ", ".join(f"{s:.2f}" for s in result["seconds"])
        print(f"| {path} | {result['best_seconds']:.2f} | {runs} | {result['peak_gb']:.2f} |")
    fused, recomputing = results["fused"]["best_seconds"], results["recomputing"]["best_seconds"]
    print(f"\nfused against recomputing: x{recomputing / fused:.2f} faster")


if __name__ == "__main__":
    main()
