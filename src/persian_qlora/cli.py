"""The ``persian-qlora`` command: thin subcommands over the public API. Only the CLI prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from persian_qlora import __version__
from persian_qlora._deprecation import warn_renamed
from persian_qlora.bases import KNOWN_BASES
from persian_qlora.dataset import DATA_FORMATS, PersianChatDataset, bundled_corpus_path
from persian_qlora.errors import PersianQLoRAError
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.normalize import NormalizerConfig

if TYPE_CHECKING:
    from persian_qlora.chat import ChatSession

_TRAINED_OPEN, _TRAINED_CLOSE = "⟦", "⟧"
_LEARNING_RATE_HELP = (
    "Learning rate: the default 2e-5 is the reference recipe's; it barely moves an adapter in a short run. In this "
    "project's sweep (Gemma 3 270M, 10 updates, docs/results.md) the validation loss went 3.957 -> 3.934 at 2e-5 "
    "against 3.490 at 1e-3. For a run of tens or a few hundred updates, raise it (--learning_rate 2e-4 or 1e-3) "
    "and check on a validation slice (--eval_fraction 0.1 --eval_steps 5); docs/models.md suggests one per model."
)


def _load_tokenizer(name_or_path: str | None):
    """The given tokenizer, or (by default) the tiny Gemma-style one trained on the bundled corpus, offline."""
    if name_or_path is None:
        from persian_qlora.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def render_masked(tokenizer, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """Show one example with its trained spans marked: ⟦...⟧ (or green when ``color``). For display only."""
    opening, closing = ("\033[1;32m", "\033[0m") if color else (_TRAINED_OPEN, _TRAINED_CLOSE)
    pieces: list[str] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:end])
            pieces.append(f"{opening}{text}{closing}" if labels[start] != IGNORE_INDEX else text)
            start = end
    return "".join(pieces)


def _prepare(args: argparse.Namespace, extra: Sequence[str]) -> int:
    tokenizer = _load_tokenizer(args.tokenizer)
    source = args.data or bundled_corpus_path(args.split)
    dataset = PersianChatDataset(
        source,
        tokenizer,
        split=args.split,
        max_length=args.max_length,
        normalize=None if args.no_normalize else NormalizerConfig(),
        on_error=args.on_error,
        data_format=args.data_format,
        columns=_yaml_mapping(args.columns, "--columns"),
    )
    if args.json:
        print(json.dumps(dataset.stats.as_dict(), ensure_ascii=False, indent=2))
        return 0
    print(f"source: {source}")
    print(f"tokenizer: {args.tokenizer or 'tiny Gemma-style tokenizer (built offline from the bundled corpus)'}")
    print(dataset.stats)
    index = min(args.example, len(dataset) - 1)
    item = dataset[index]
    print(f"\nexample {index}, trained tokens marked {_TRAINED_OPEN}...{_TRAINED_CLOSE}:")
    print(render_masked(tokenizer, item["input_ids"], item["labels"], color=sys.stdout.isatty()))
    return 0


def _yaml_mapping(text: str | None, option: str) -> dict[str, object] | None:
    """A YAML flow mapping given on the command line, e.g. ``{prompt: question, completion: answer}``."""
    import yaml

    if text is None:
        return None
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise PersianQLoRAError(f"{option} takes a mapping such as '{{prompt: question, completion: answer}}'")
    return value


def _parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """``--key value`` pairs (values read as YAML scalars: 3, 2e-5, true, [a, b]) into a dict."""
    import yaml

    overrides: dict[str, object] = {}
    items = list(pairs)
    while items:
        key = items.pop(0)
        if not key.startswith("--") or len(key) == 2:
            raise PersianQLoRAError(f"expected --key value, got {key!r}")
        key = key[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
        elif items and not items[0].startswith("--"):
            value = items.pop(0)
        else:
            raise PersianQLoRAError(f"--{key} needs a value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _add_output_option(parser: argparse.ArgumentParser, dest: str, *, metavar: str = "DIR", **kwargs) -> None:
    """Where a command writes: ``--output-dir`` and ``--output`` are the same option in every command."""
    parser.add_argument("--output-dir", "--output", dest=dest, metavar=metavar, **kwargs)


def _add_run_options(parser: argparse.ArgumentParser, tiny_help: str) -> None:
    """The options `train` and `compare` share; other settings come as --key value overrides."""
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("--model", help="model id or path (default: google/gemma-3-1b-it)")
    parser.add_argument("--data", help="training dataset name or file (default: mshojaei77/persian-gk)")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.set_defaults(takes_overrides=True)


def _run_config(args: argparse.Namespace, extra: Sequence[str]):
    """Recipe defaults, then --config, then --key value pairs and the named options."""
    from persian_qlora.training import RunConfig

    overrides = _parse_overrides(extra)
    for name in ("method", "model", "data", "output_dir"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if args.tiny:
        overrides["tiny"] = True
    return RunConfig.load(args.config, overrides)


def _train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from persian_qlora.training import run_training

    config = _run_config(args, extra)
    what = "tiny random Gemma 3 + bundled corpus (offline)" if config.tiny else f"{config.model} on {config.data}"
    print(f"persian-qlora train: {config.method} of {what} -> {config.train.output_dir}")
    output = run_training(config, resume=args.resume)
    print(f"adapter, tokenizer, metrics.json and charts saved to {output}")
    return 0


def _print_report(report: dict, output_dir: str) -> None:
    from persian_qlora.report import behaviour_table_lines, merge_table_lines, table_lines, verdict_lines

    print("\n".join(table_lines(report)))
    print("\nbehaviour of the replies:")
    print("\n".join(behaviour_table_lines(report)))
    merge_table = merge_table_lines(report)
    if merge_table:
        print("\nmerge bases (the adapter as trained, and merged into bf16):")
        print("\n".join(merge_table))
    print("\nwhat changed:")
    print("\n".join(verdict_lines(report)))
    print(
        f"\nreport: {Path(output_dir) / 'report.md'} (and report.json, loss.png, grad_norm.png, metrics.png, "
        "resources.png)"
    )


def _compare(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from persian_qlora.compare import CompareConfig, compare

    config = CompareConfig(
        run=_run_config(args, extra),
        output_dir=args.compare_dir,
        test_data=args.test_data,
        test_split=args.test_split,
        max_eval=args.max_eval,
        max_new_tokens=args.max_new_tokens,
    )
    _print_report(compare(config), config.output_dir)
    return 0


def _demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from persian_qlora.compare import compare, demo_config

    device = "GPU" if _cuda() else "CPU"
    output_dir = args.output_dir or ("runs/demo" if args.base == "tiny" else f"runs/demo-{args.base}")
    if args.base == "tiny":
        print(
            "persian-qlora demo: base vs QLoRA vs LoRA (+ merged QLoRA) on a tiny Persian Gemma 3 and the bundled "
            f"corpus, offline, on {device}. Takes a few minutes; output in {output_dir}"
        )
    else:
        _print_base_notice(args.base)
        print(
            f"persian-qlora demo: base vs QLoRA vs LoRA (+ merged QLoRA) on {args.base} and the "
            f"bundled corpus, offline, on {device}. Output in {output_dir}"
        )
    config = demo_config(output_dir, base=args.base, overrides=_parse_overrides(extra))
    if args.max_eval is not None:
        config.max_eval = args.max_eval
    if args.max_new_tokens is not None:
        config.max_new_tokens = args.max_new_tokens
    _print_report(compare(config), config.output_dir)
    return 0


def _print_base_notice(name: str) -> None:
    from persian_qlora.bases import KNOWN_BASES, cache_dir

    known = KNOWN_BASES[name]
    print(f"base: {known.description}")
    print(f"cache: {cache_dir() / name} (prepared once, about a minute and a half on 2 CPU cores)")
    print(f"These weights fall under the {known.terms}. persian-qlora does not distribute them.")


def _prepare_base(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import time

    from persian_qlora.bases import GEMMA_TERMS_URL, prepare_base, prepare_gguf_base

    started = time.perf_counter()
    if args.gguf is not None:
        if args.output is None:
            raise PersianQLoRAError("--gguf needs --output, the directory for the prepared checkpoint")
        path = prepare_gguf_base(args.gguf, args.output, overwrite=args.overwrite)
        print(f"The weights keep the licence they came with; for Gemma, the Gemma Terms of Use ({GEMMA_TERMS_URL}).")
    else:
        _print_base_notice(args.name)
        path = prepare_base(args.name, overwrite=args.overwrite)
    print(f"prepared base: {path} ({time.perf_counter() - started:.0f} s)")
    print(f"use it as any checkpoint: persian-qlora train --model {path} --data YOUR.jsonl --output-dir runs/mine")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _chat(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from persian_qlora.chat import ChatSession
    from persian_qlora.generation import AS_TRAINED, load_for_inference

    load_in = args.load_in
    if args.quantization is not None:
        warn_renamed("--quantization", "--load-in", "persian-qlora chat")
        load_in = load_in or args.quantization
    model, tokenizer = load_for_inference(args.model, args.adapter, load_in=load_in)
    sampling = (
        {"do_sample": False}
        if args.greedy
        else {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    )
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        normalize=None if args.no_normalize else AS_TRAINED,
    )
    chat_loop(session)
    return 0


def chat_loop(session: ChatSession) -> None:
    """Talk with ``session`` on standard input and output, as ``persian-qlora chat`` does.

    Each line is a turn and the reply streams in as it is generated. Empty lines are skipped, ``/reset`` clears
    the conversation, ``/exit`` or end of input ends the loop. Output is UTF-8 whatever the locale, and the
    prompts show only when standard input is a terminal, so piped input works too.
    """
    for stream in (sys.stdin, sys.stdout):  # Persian must read and print on any locale
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")
    interactive = sys.stdin.isatty()
    if interactive:
        print("persian-qlora chat: /reset clears the conversation, /exit quits.")
    while True:
        try:
            text = input("شما> " if interactive else "").strip()
        except EOFError:
            break
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if not text:
            continue
        print("مدل> ", end="", flush=True)
        for piece in session.send(text):
            print(piece, end="", flush=True)
        print()


def _merge(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import torch

    from persian_qlora.merging import merge_to_fp16

    base = args.base
    if base is None:
        config = json.loads((Path(args.adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        base = config["base_model_name_or_path"]
    result = merge_to_fp16(
        base,
        args.adapter,
        args.output,
        gguf_file=args.gguf_file,
        dtype=getattr(torch, args.dtype),
        merge_base=args.merge_base,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        verify={None: False, "all": True, "tensors": "tensors"}[args.verify],
        strict=args.strict,
    )
    print(
        f"merged {args.adapter} into {base} ({args.merge_base} base, {args.dtype}): {result.merged_tensors} tensors "
        f"merged, {result.copied_tensors} copied -> {result.output_dir}"
    )
    if not result.tied_head:
        print("the adapter trained the LM head apart from the embedding: both are written (tie_word_embeddings false)")
    if result.update_rounding is not None:
        print(
            f"verify: every tensor re-read and checked; {args.dtype} rounding loses at most "
            f"{result.update_rounding:.1%} of an update ({result.update_rounding_tensor})"
        )
    if result.max_abs_logit_diff is not None:
        print(f"verify: max |logit difference| merged vs base+adapter = {result.max_abs_logit_diff:.3g}")
    if args.push_to_hub:
        from persian_qlora.merging import push_to_hub

        url = push_to_hub(result.output_dir, args.push_to_hub, private=not args.public)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


def _export_gguf(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from persian_qlora.export import export_adapter_gguf, export_gguf

    if args.adapter is not None:
        result = export_adapter_gguf(
            args.adapter,
            args.output,
            base=args.base,
            quantization=args.quantization,
            overwrite=args.overwrite,
            merge_base=args.merge_base,
            gguf_file=args.gguf_file,
            strict=args.strict,
        )
    else:
        if args.base is not None or args.gguf_file is not None:
            raise PersianQLoRAError("--base and --gguf-file go with --adapter; --model is already a whole model")
        result = export_gguf(args.model, args.output, quantization=args.quantization, overwrite=args.overwrite)
    size = result.path.stat().st_size / 2**30
    print(f"wrote {result.path} ({result.quantization}, {result.tensors} tensors, {size:.2f} GiB)")
    print(f"and {result.modelfile}")
    print(f"Ollama: ollama create NAME -f {result.modelfile}   llama.cpp: llama-cli -m {result.path} -cnv")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persian-qlora", description="Fine-tune Gemma chat models on Persian conversations with QLoRA or LoRA."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser(
        "prepare", help="load, validate and tokenize a chat dataset; print its statistics and a masked example"
    )
    prepare.add_argument("--data", help="hub dataset name or .jsonl/.json/.parquet file (default: bundled corpus)")
    prepare.add_argument("--split", default="train", help="dataset split (default: train)")
    prepare.add_argument("--tokenizer", help="tokenizer name or path (default: the offline tiny Gemma tokenizer)")
    prepare.add_argument("--max-length", type=int, default=4000, help="truncate conversations to this many tokens")
    prepare.add_argument("--no-normalize", action="store_true", help="keep text exactly as it is")
    prepare.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="on a malformed record")
    prepare.add_argument(
        "--data-format", choices=DATA_FORMATS, help="read every record in this format (default: detect it)"
    )
    prepare.add_argument(
        "--columns",
        metavar="MAPPING",
        help="the dataset's own field names, as YAML, e.g. '{prompt: question, completion: answer}'",
    )
    prepare.add_argument("--example", type=int, default=0, help="index of the masked example to show")
    prepare.add_argument("--json", action="store_true", help="print the statistics as JSON only")
    prepare.set_defaults(run=_prepare)

    train = commands.add_parser(
        "train",
        help="fine-tune with QLoRA or LoRA",
        description="Fine-tune with QLoRA or LoRA. Settings: the reference recipe, then --config YAML (flat, or "
        "in model:/data:/lora:/train: sections; examples/run.yaml sets every one), then --key value overrides (any "
        "RunConfig/TrainConfig field, lora_r/lora_alpha/lora_dropout/lora_target_modules, or any transformers "
        "TrainingArguments field), e.g. --eval_fraction 0.05 --early_stopping_patience 3 --load_best_model_at_end "
        "true --on_error skip; data: --data-format alpaca --columns '{instruction: q, output: a}' --normalize "
        "false; model: --attn-implementation eager --text-only false --device-map auto "
        "--per-layer-embeddings-on-host false; logs: --report-to tensorboard. Unknown keys are refused.",
    )
    train.epilog = _LEARNING_RATE_HELP
    _add_run_options(train, "offline preset: tiny random Gemma 3 + bundled corpus")
    train.add_argument("--method", choices=["qlora", "lora"], help="default: qlora")
    _add_output_option(train, "output_dir", help="where checkpoints, the adapter and metrics go")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output-dir")
    train.set_defaults(run=_train)

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base and save a 16-bit model")
    merge.add_argument("--adapter", required=True, help="adapter directory (from train)")
    merge.add_argument("--base", help="base model id or path (default: the adapter's base_model_name_or_path)")
    _add_output_option(merge, "output", required=True, help="directory for the merged model (must not exist)")
    merge.add_argument("--gguf-file", help="the base is this GGUF file (a path, or a file in --base)")
    merge.add_argument("--merge-base", choices=["original", "nf4"], default="original", help="see docs/merging.md")
    merge.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="output dtype (float16 is refused when its forward overflows)",
    )
    merge.add_argument("--max-shard-size", default="2GB")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    merge.add_argument(
        "--verify",
        nargs="?",
        const="all",
        choices=["all", "tensors"],
        help="re-read every written tensor and compare merged and base+adapter logits (needs the model in fp32); "
        "'--verify tensors': the per-tensor check alone, in the merge's own memory",
    )
    merge.add_argument(
        "--strict",
        action="store_true",
        help="refuse a base whose name or config differs from the one the adapter was trained on (default: warn)",
    )
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the merged model and its card to the hub")
    merge.add_argument("--public", action="store_true", help="with --push-to-hub: a public repository")
    merge.set_defaults(run=_merge)

    export = commands.add_parser(
        "export-gguf",
        help="write a merged Gemma 3 or 4 as a GGUF file for llama.cpp and Ollama, with an Ollama Modelfile",
        description="Write a merged Gemma 3 or 4 (a 'merge' output or any Gemma 3 or 4 checkpoint; the language "
        "model of a multimodal one) as one GGUF file, and an Ollama Modelfile beside it (FILE with the suffix "
        ".Modelfile). With --adapter, merge the adapter into its base first (streaming, into a temporary folder "
        "removed afterwards). See docs/export.md.",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="the merged model directory (from merge)")
    source.add_argument("--adapter", help="a LoRA adapter directory (from train): merged into --base, then exported")
    export.add_argument("--base", help="with --adapter: base model id or path (default: the adapter's base)")
    export.add_argument("--gguf-file", help="with --adapter: the base is this GGUF file (a path, or a file in --base)")
    export.add_argument(
        "--merge-base", choices=["original", "nf4"], default="original", help="with --adapter: see docs/merging.md"
    )
    export.add_argument(
        "--strict", action="store_true", help="with --adapter: refuse a base other than the one it was trained on"
    )
    _add_output_option(
        export, "output", required=True, metavar="FILE", help="the GGUF file to write, e.g. persian-gemma.q8_0.gguf"
    )
    export.add_argument(
        "--quantization",
        choices=["auto", "bf16", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
        default="auto",
        help="weight type; auto: the checkpoint's own 16-bit type (norms stay F32 in every case); q4_0 keeps the "
        "tied embedding Q8_0; the k-quants (q4_k_m, the usual download, q5_k_m, q6_k) are written by llama.cpp's "
        "own quantizer and need the llama extra",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing file and Modelfile")
    export.set_defaults(run=_export_gguf)

    comparison = commands.add_parser(
        "compare",
        help="base vs QLoRA vs LoRA: train both, evaluate before/after, write a report",
        description="Train QLoRA and LoRA with the same settings and evaluate the base, both adapters and the "
        "merged QLoRA model. Settings as for 'train' (--config YAML, --key value overrides).",
    )
    _add_run_options(comparison, "offline: tiny Persian base + bundled corpus")
    comparison.add_argument("--test-data", help="evaluation dataset (default: --data)")
    comparison.add_argument("--test-split", default="test", help="evaluation split (default: test)")
    comparison.add_argument("--max-eval", type=int, help="evaluate at most this many conversations")
    comparison.add_argument("--max-new-tokens", type=int, default=256)
    _add_output_option(comparison, "compare_dir", default="runs/compare", help="the report directory")
    comparison.set_defaults(run=_compare)

    chat = commands.add_parser("chat", help="talk to a merged model or a base + adapter in the terminal")
    chat.add_argument("--model", required=True, help="merged model, or the base when --adapter is given")
    chat.add_argument("--adapter", help="LoRA adapter directory")
    chat.add_argument("--load-in", choices=["8bit", "4bit"], help="load the weights quantised with bitsandbytes")
    chat.add_argument("--quantization", choices=["8bit", "4bit"], help=argparse.SUPPRESS)  # deprecated: --load-in
    chat.add_argument("--system", help="a system prompt for the whole conversation")
    chat.add_argument("--temperature", type=float, default=0.1)
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--top-k", type=int, default=64)
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument(
        "--no-normalize",
        action="store_true",
        help="send your text as typed (default: Persian-normalised as the training text was, e.g. ي→ی, ك→ک)",
    )
    chat.set_defaults(run=_chat)

    demo = commands.add_parser(
        "demo",
        help="the whole comparison offline on the bundled corpus: a tiny model, or a real Gemma 3 270M",
        description="The whole comparison offline on the bundled corpus. --key value pairs override training "
        "settings (as for 'train'), e.g. --max_steps 2 for a smoke run.",
    )
    demo.add_argument(
        "--base",
        choices=["tiny", *KNOWN_BASES],
        default="tiny",
        help="tiny: a 2.8M-parameter Persian LM built here (default); gemma3-270m: the real Gemma 3 270M, "
        "from the gemma3-270m extra, 27 minutes measured on 2 CPU cores",
    )
    _add_output_option(demo, "output_dir", help="the report directory (default: runs/demo, or runs/demo-BASE)")
    demo.add_argument("--max-eval", type=int, help="evaluate at most this many test conversations")
    demo.add_argument("--max-new-tokens", type=int, help="cap each generated reply (default: the demo's)")
    demo.set_defaults(run=_demo, takes_overrides=True)

    prepare_base = commands.add_parser(
        "prepare-base",
        help="convert a GGUF Gemma into a cached checkpoint directory (bf16, tokenizer, chat template)",
        description="Convert a GGUF Gemma into an ordinary checkpoint directory, once: bf16 safetensors, the "
        "tokenizer with the Gemma 3 chat template, a generation config stopping on <eos> and <end_of_turn>. "
        "Either a known base by name (cached), or --gguf FILE --output DIR.",
    )
    prepare_base.add_argument("name", nargs="?", default="gemma3-270m", choices=list(KNOWN_BASES))
    prepare_base.add_argument("--gguf", help="a GGUF file to convert instead of a known base")
    _add_output_option(prepare_base, "output", help="with --gguf: the directory to write")
    prepare_base.add_argument("--overwrite", action="store_true", help="prepare again, replacing the directory")
    prepare_base.set_defaults(run=_prepare_base)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # bitsandbytes warns on every run that an optional kernel for its AVX512-BF16 weight repacking is missing;
    # persian-qlora turns that repacking off (see modeling.py), so the warning is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return args.run(args, extra)
    except (PersianQLoRAError, FileNotFoundError, FileExistsError, ValueError, ConnectionError) as err:
        print(f"persian-qlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
