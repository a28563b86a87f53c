"""Evaluation generation: batched, length-sorted `generate` against a per-sample loop, on the bundled test split.

Greedy decoding, so the replies must be the same text either way; the script checks that and prints the speed-up.
Each setting runs in a fresh process. Besides wall-clock and CPU time, each reports where its time went, from hooks
on the model: the LM head, the decoder layers, and the rest of ``generate`` (logits processors, the cache, argmax,
Python), split into the prefill (the prompt) and the decoding steps; and the padding it computed: prompt positions
that are left padding, and decoding rows that had already stopped (a batch decodes until its longest reply ends).

The model (``--model``): ``gemma3-270m`` is the real Gemma 3 270M (the gemma3-270m extra, ``prepare_base``); the
default is the offline demo's base (a tiny Gemma 3 pretrained here on the train split's Persian text, about 30 s
to build); or a model directory.

``--suppress-steps`` times the suppression of the untrained tokens alone at Gemma's vocabulary: the library's
processor against transformers' ``SuppressTokensLogitsProcessor`` (which ``suppress_tokens=`` uses).

    python benchmarks/generation.py --model gemma3-270m
    python benchmarks/generation.py --model gemma3-270m --settings loop "batched 16" --new-tokens 64
    python benchmarks/generation.py --model gemma3-270m --suppress-steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ["loop", "batched 8", "batched 16", "batched 49", "batched 16, static cache"]


def resolve_model(name: str | None) -> str:
    if name == "gemma3-270m":
        from persian_qlora.bases import prepare_base

        return str(prepare_base("gemma3-270m"))
    if name is None:
        from persian_qlora.testing import build_tiny_persian_lm

        return str(build_tiny_persian_lm(Path(tempfile.mkdtemp()) / "tiny-persian-lm"))
    return name


class Timings:
    """Seconds in the LM head and in the decoder, for the prefill and the decoding steps, from forward hooks; and
    the positions each computed."""

    def __init__(self, model) -> None:
        self.seconds = {
            f"{part} {phase}": 0.0 for part in ("head", "decoder", "forward") for phase in ("prefill", "decode")
        }
        self.positions = {"prefill": 0, "decode": 0}
        self.steps = {"prefill": 0, "decode": 0}
        self._started: dict[str, float] = {}
        self._phase = "prefill"
        for name, module in (
            ("head", model.get_output_embeddings()),
            ("decoder", model.get_decoder()),
            ("forward", model),
        ):
            module.register_forward_pre_hook(self._pre(name), with_kwargs=True)
            module.register_forward_hook(self._post(name))

    def _pre(self, name):
        def hook(_module, args, kwargs):
            if name == "forward":
                ids = kwargs.get("input_ids", args[0] if args else None)
                self._phase = "prefill" if ids.shape[1] > 1 else "decode"
                self.positions[self._phase] += ids.numel()
                self.steps[self._phase] += 1
            self._started[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(_module, _args, _output):
            self.seconds[f"{name} {self._phase}"] += time.perf_counter() - self._started[name]

        return hook


def worker(model_path: str, setting: str, new_tokens: int) -> dict:
    import torch

    from persian_qlora import PersianChatDataset, evaluation_pairs, generate, load_for_inference

    model, tokenizer = load_for_inference(model_path)
    prompts = evaluation_pairs(PersianChatDataset.bundled(tokenizer, "test").conversations)[0]
    kwargs = {"batch_size": 1} if setting == "loop" else {"batch_size": int(setting.split()[1].rstrip(","))}
    if setting.endswith("static cache"):
        kwargs["cache_implementation"] = "static"
    generate(model, tokenizer, prompts[:2], max_new_tokens=4)  # warm-up
    timings = Timings(model)
    load_before, cpu_started = os.getloadavg()[0], time.process_time()
    result = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, **kwargs)
    cpu_seconds = time.process_time() - cpu_started
    lengths = [
        len(ids)
        for ids in tokenizer(
            tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
    ]
    return {
        "setting": setting,
        "seconds": result.seconds,
        "cpu_seconds": cpu_seconds,
        "texts": result.texts,
        "new_tokens": result.new_tokens,
        "timings": timings.seconds,
        "positions": timings.positions,
        "steps": timings.steps,
        "prompt_tokens": sum(lengths),
        "load_average": [load_before, os.getloadavg()[0]],
        "threads": torch.get_num_threads(),
    }


def suppress_steps(model_path: str, repeats: int = 20) -> None:
    """Milliseconds per decoding step of the two suppressions, at the model's vocabulary and a few batch sizes."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, SuppressTokensLogitsProcessor

    from persian_qlora.generation import _SuppressTokens
    from persian_qlora.tokens import untrained_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    ids = untrained_token_ids(tokenizer)
    print(f"{len(ids)} untrained ids suppressed, vocabulary {vocab}; ms per step, best of {repeats}\n")
    print("| batch | transformers' SuppressTokensLogitsProcessor | persian-qlora's | same scores |")
    print("|---|---|---|---|")
    for batch in (1, 16, 49):
        scores = torch.randn(batch, vocab)
        input_ids = torch.zeros(batch, 1, dtype=torch.long)
        times = {}
        outputs = {}
        for name, processor in (("theirs", SuppressTokensLogitsProcessor(ids)), ("ours", _SuppressTokens(ids))):
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                outputs[name] = processor(input_ids, scores)
                best = min(best, time.perf_counter() - started)
            times[name] = best * 1000
        same = torch.equal(outputs["theirs"], outputs["ours"])
        print(f"| {batch} | {times['theirs']:.2f} | {times['ours']:.3f} | {same} |")


def report(results: dict[str, dict], new_tokens: int) -> None:
    """The tables, from the workers' results (the first setting is the one compared against)."""
    first = next(iter(results.values()))
    prompts = f"{len(first['texts'])} test prompts ({first['prompt_tokens']} prompt tokens)"
    print(f"\n{prompts}, up to {new_tokens} new tokens")
    columns = "seconds | CPU-seconds | new tokens/s | speed-up | speed-up in CPU time"
    print(f"\n| generation | {columns} | same replies as the first |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["texts"], first["texts"], strict=True))
        print(
            f"| {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {sum(r['new_tokens']) / r['seconds']:.1f} "
            f"| x{first['seconds'] / r['seconds']:.2f} | x{first['cpu_seconds'] / r['cpu_seconds']:.2f} "
            f"| {same}/{len(first['texts'])} |"
        )
    print(
        "\nwhere the time goes (seconds). 'other': the model's forward besides its head and decoder; 'outside "
        "forward': generate's own work (logits processors, argmax, stopping), tokenising and decoding"
    )
    print(
        "| generation | prefill: head | prefill: decoder | prefill: other | decode: head | decode: decoder "
        "| decode: other | outside forward | prompt positions computed / real | decode rows computed / useful |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t = r["timings"]
        cells = []
        for phase in ("prefill", "decode"):
            other = t[f"forward {phase}"] - t[f"head {phase}"] - t[f"decoder {phase}"]
            cells += [f"{t[f'head {phase}']:.1f}", f"{t[f'decoder {phase}']:.1f}", f"{other:.1f}"]
        outside = r["seconds"] - t["forward prefill"] - t["forward decode"]
        useful = sum(r["new_tokens"]) - len(r["new_tokens"])  # the first new token comes from the prefill
        print(
            f"| {name} | {' | '.join(cells)} | {outside:.1f} | {r['positions']['prefill']} / {r['prompt_tokens']} "
            f"| {r['positions']['decode']} / {useful} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="gemma3-270m, or a model directory (default: the demo's tiny Persian LM)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per reply")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help=f"from {SETTINGS} (any 'batched N')")
    parser.add_argument("--suppress-steps", action="store_true", help="time the two suppressions alone")
    parser.add_argument("--results", type=Path, nargs="+", help="print the tables from saved workers' results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(worker(args.model, args.worker, args.new_tokens)))
        return
    if args.results:
        loaded = [json.loads(path.read_text()) for path in args.results]
        report({r["setting"]: r for r in loaded}, args.new_tokens)
        return

    import torch
    import transformers

    model_path = resolve_model(args.model)
    if args.suppress_steps:
        suppress_steps(model_path)
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: {model_path}; device: {device}; torch {torch.__version__}, transformers {transformers.__version__}")
    workdir = Path(tempfile.mkdtemp(prefix="generation-"))
    results = {}
    for setting in args.settings:
        result_file = workdir / f"{setting.replace(' ', '').replace(',', '')}.json"
        command = [sys.executable, __file__, "--worker", setting, "--model", model_path, "--result", str(result_file)]
        subprocess.run([*command, "--new-tokens", str(args.new_tokens)], check=True)
        results[setting] = json.loads(result_file.read_text())
        r = results[setting]
        print(f"{setting}: {r['seconds']:.1f} s, {r['cpu_seconds']:.1f} CPU-s, load {r['load_average']}", flush=True)

    report(results, args.new_tokens)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"\nresults: {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
