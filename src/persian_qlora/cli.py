"""The ``persian-qlora`` command: thin subcommands over the public API. Only the CLI prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from persian_qlora import __version__
from persian_qlora.dataset import PersianChatDataset, bundled_corpus_path
from persian_qlora.errors import PersianQLoRAError
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.normalize import NormalizerConfig

_TRAINED_OPEN, _TRAINED_CLOSE = "⟦", "⟧"


def _load_tokenizer(name_or_path: str | None):
    """The given tokenizer, or (by default) the tiny Gemma-style one trained on the bundled corpus, offline."""
    if name_or_path is None:
        from persian_qlora.testing import build_tiny_tokenizer

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


def _prepare(args: argparse.Namespace) -> int:
    tokenizer = _load_tokenizer(args.tokenizer)
    source = args.data or bundled_corpus_path(args.split)
    dataset = PersianChatDataset(
        source,
        tokenizer,
        split=args.split,
        max_length=args.max_length,
        normalize=None if args.no_normalize else NormalizerConfig(),
        on_error=args.on_error,
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
    prepare.add_argument("--example", type=int, default=0, help="index of the masked example to show")
    prepare.add_argument("--json", action="store_true", help="print the statistics as JSON only")
    prepare.set_defaults(run=_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except (PersianQLoRAError, FileNotFoundError) as err:
        print(f"persian-qlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
