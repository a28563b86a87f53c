"""`PersianChatDataset`: load conversations from anywhere, validate and clean them, tokenize with Gemma labels.

The path of one record: source (hub / JSON / JSONL / Parquet / list / ``datasets.Dataset``) -> its format (ChatML
``messages``, ShareGPT, TRL prompt-completion or Alpaca, detected or given) as messages -> validation with an
error naming the record -> cleaning (roles, empty turns, system turns, same-role runs, Persian normalisation,
duplicates) -> the tokenizer's own chat template -> token ids and model-turn labels, truncated to ``max_length``.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from persian_qlora._deprecation import renamed_arguments
from persian_qlora.errors import ConfigError, InvalidRecordError, PersianQLoRAError
from persian_qlora.families import reserved_tokens
from persian_qlora.masking import IGNORE_INDEX, GemmaTurnMarkers, model_turn_labels
from persian_qlora.normalize import DEFAULT_NORMALIZER, NormalizerConfig, normalize_persian

__all__ = [
    "DATA_FORMATS",
    "Conversation",
    "DatasetStats",
    "PersianChatDataset",
    "bundled_corpus_path",
    "clean_conversation",
    "iter_records",
]

logger = logging.getLogger("persian_qlora")

Message = dict[str, str]
Conversation = list[Message]
OnError = Literal["raise", "skip"]
Policy = Literal["fold", "merge", "error"]
DataFormat = Literal["messages", "sharegpt", "prompt_completion", "alpaca"]

# Each format and the fields that identify it, in the order detection tries them: a record with "messages" is
# ChatML even when it also carries a "prompt" column (HuggingFaceH4/ultrachat_200k has both).
_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
DATA_FORMATS: tuple[str, ...] = tuple(_FORMAT_FIELDS)
_FORMAT_NAMES = {
    "messages": "ChatML",
    "sharegpt": "ShareGPT",
    "prompt_completion": "TRL prompt-completion",
    "alpaca": "Alpaca",
}
# The fields `columns=` can map from a dataset's own names; "input", "system" and "history" (LLaMA-Factory's earlier
# [instruction, output] pairs) are Alpaca's optional ones.
_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "system", "history")

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "model": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
}
_PERSIAN_WORD = re.compile("[\u0600-\u06ff\u200c]*[\u0620-\u064a\u067e-\u06d3][\u0600-\u06ff\u200c]*")
_SPLITS = ("train", "test")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def bundled_corpus_path(split: str = "train") -> Path:
    """The JSONL file of the bundled Persian chat corpus (CC-BY-4.0), split ``"train"`` or ``"test"``."""
    if split not in _SPLITS:
        raise ValueError(f"the bundled corpus has splits {_SPLITS}, not {split!r}")
    return Path(str(resources.files("persian_qlora").joinpath("data", f"persian_chat_{split}.jsonl")))


# --------------------------------------------------------------------------------------------------- sources


def iter_records(source: Any, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` pairs from any supported source; ``where`` names the file line or record index.

    A local file is read as JSONL (``.jsonl``), JSON (``.json``, a list of records) or Parquet (``.parquet``);
    any other string (a hub dataset name, or a local dataset directory) goes to ``datasets.load_dataset``.
    JSONL lines that are not UTF-8 or not JSON are yielded as :class:`InvalidRecordError` objects, so the caller
    can raise or skip them like any other bad record.
    """
    if isinstance(source, (str, Path)) and Path(source).is_file():
        yield from _iter_file(Path(source))
    elif isinstance(source, (str, Path)) and str(source).lower().endswith(_FILE_SUFFIXES):
        raise FileNotFoundError(f"no such data file: {source}")
    elif isinstance(source, (str, Path)):
        source = str(source)
        import datasets

        yield from _iter_rows(datasets.load_dataset(source, split=split), f"{source}[{split}]")
    elif _is_hf_dataset(source):
        if isinstance(source, Mapping):  # a DatasetDict: take the split
            yield from _iter_rows(source[split], f"dataset[{split}]")
        else:
            yield from _iter_rows(source, "dataset")
    elif isinstance(source, Sequence):
        yield from _iter_rows(source, "")
    else:
        raise TypeError(
            f"unsupported source {type(source).__name__}: pass a file path, a hub dataset name, a list of "
            "conversations or a datasets.Dataset"
        )


def _is_hf_dataset(source: Any) -> bool:
    return type(source).__module__.startswith("datasets.")


def _iter_rows(rows: Iterable[Any], label: str) -> Iterator[tuple[str, Any]]:
    prefix = f"{label} " if label else ""
    for index, row in enumerate(rows):
        yield f"{prefix}record {index}", row


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise InvalidRecordError(
            str(path), "unsupported file", f"unsupported file type {suffix!r}; use .jsonl, .json or .parquet"
        )


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # Read line by line ourselves (not via datasets/pyarrow) so an error names the line and the rest still loads.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path.name} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    where,
                    InvalidRecordError(
                        where,
                        "not UTF-8",
                        f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not valid UTF-8; "
                        "re-save the file as UTF-8",
                    ),
                )
                continue
            text = text.lstrip("\ufeff") if number == 1 else text
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                yield (
                    where,
                    InvalidRecordError(
                        where,
                        "broken JSON",
                        f"is not valid JSON ({err.msg} at column {err.colno}); fix or remove the line",
                    ),
                )


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise InvalidRecordError(
            path.name, "not UTF-8", f"byte at offset {err.start} is not valid UTF-8; re-save the file as UTF-8"
        ) from None
    except json.JSONDecodeError as err:
        raise InvalidRecordError(
            path.name, "broken JSON", f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(data, list):
        raise InvalidRecordError(
            path.name,
            "not a list",
            f"holds a JSON {type(data).__name__}; a .json file must hold a list of conversations "
            "(use .jsonl for one conversation per line)",
        )
    yield from _iter_rows(data, path.name)


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise InvalidRecordError(path.name, "unreadable file", f"cannot be read as Parquet: {err}") from None
    yield from _iter_rows(table.to_pylist(), path.name)


# ------------------------------------------------------------------------------------------ validation, cleaning


@dataclass
class CleaningCounts:
    """Message-level repairs made while cleaning (conversations are kept)."""

    empty_messages_dropped: int = 0
    system_turns_folded: int = 0
    same_role_turns_merged: int = 0
    trailing_user_turns_dropped: int = 0


def check_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Every record field's name in the data: ``columns`` (our field -> the dataset's own name) over the defaults.

    Raises :class:`ConfigError` for a key that is not one of our fields, naming the nearest.
    """
    names = {name: name for name in _FIELDS}
    for ours, theirs in (columns or {}).items():
        if ours not in names:
            guess = difflib.get_close_matches(str(ours), _FIELDS, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise ConfigError(f"columns: {ours!r} is not a record field; map any of {list(_FIELDS)}{hint}")
        if not isinstance(theirs, str):
            raise ConfigError(f"columns: {ours!r} must map to a field name (a string), got {theirs!r}")
        names[ours] = theirs
    return names


def check_data_format(data_format: str | None) -> None:
    """Refuse a ``data_format`` that is not one of :data:`DATA_FORMATS` (None: detect), naming the nearest."""
    if data_format is not None and data_format not in _FORMAT_FIELDS:
        guess = difflib.get_close_matches(str(data_format), DATA_FORMATS, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ConfigError(
            f"data_format must be one of {list(DATA_FORMATS)} or None (detect), got {data_format!r}{hint}"
        )


def _record_format(record: Any, where: str, names: Mapping[str, str], data_format: str | None = None) -> str:
    """The format of one record: ``data_format`` when given (its fields must be there), else detected from its
    fields (a field holding None counts as absent, as in a ``datasets`` table of mixed rows)."""
    if not isinstance(record, Mapping):
        raise InvalidRecordError(
            where, "not an object", f"is a {type(record).__name__}, expected an object such as {{'messages': [...]}}"
        )
    present = {ours for ours, theirs in names.items() if record.get(theirs) is not None}
    if data_format is not None:
        missing = [names[f] for f in _FORMAT_FIELDS[data_format] if f not in present]
        if missing:
            raise InvalidRecordError(
                where,
                "missing field",
                f"lacks {' and '.join(map(repr, missing))}, which data_format={data_format!r} needs; its keys are "
                f"{sorted(record)} (map other field names with columns=)",
            )
        return data_format
    for candidate, required in _FORMAT_FIELDS.items():
        if present.issuperset(required):
            return candidate
    choices = [
        f"{' and '.join(repr(names[f]) for f in required)} ({_FORMAT_NAMES[name]})"
        for name, required in _FORMAT_FIELDS.items()
    ]
    expected = f"{', '.join(choices[:-1])} or {choices[-1]}"
    hints = [
        f"it has {' and '.join(repr(names[f]) for f in required if f in present)} but not "
        f"{' and '.join(repr(names[f]) for f in required if f not in present)}"
        for required in _FORMAT_FIELDS.values()
        if 0 < len(present.intersection(required)) < len(required)
    ]
    for key in sorted(map(str, record)):
        guess = difflib.get_close_matches(key, list(names.values()), n=1, cutoff=0.8)
        if guess and guess[0] != key:
            hints.append(f"did you mean {guess[0]!r} for {key!r}?")
    raise InvalidRecordError(
        where,
        "unknown format",
        f"is in an unknown format: its keys are {sorted(record)}, expected {expected}"
        + "".join(f"; {hint}" for hint in hints)
        + "; map other field names with columns=",
    )


def _message_list(record: Mapping[str, Any], field: str, where: str) -> list[Any]:
    messages = record[field]
    if not isinstance(messages, list):
        raise InvalidRecordError(
            where, "messages not a list", f"{field!r} is a {type(messages).__name__}, expected a list of messages"
        )
    return messages


def _record_turns(
    record: Mapping[str, Any], data_format: str, names: Mapping[str, str], where: str
) -> list[tuple[str | None, int | None, Any]]:
    """The record's messages in order, each as ``(field, index, message)``: where an error should point.

    Our own reading, not TRL's ``maybe_convert_to_chatml``: that one renames ShareGPT's keys but keeps its roles
    (``human``, ``gpt``), and TRL has no Alpaca; LLaMA-Factory's and axolotl's converters are not libraries.
    """
    if data_format in ("messages", "sharegpt"):
        key = names["messages" if data_format == "messages" else "conversations"]
        return [(None, index, message) for index, message in enumerate(_message_list(record, key, where))]
    if data_format == "prompt_completion":
        # TRL's two shapes: both strings ("standard"), or both lists of messages ("conversational").
        prompt, completion = names["prompt"], names["completion"]
        if isinstance(record[prompt], list) and isinstance(record[completion], list):
            return [(f, i, m) for f in (prompt, completion) for i, m in enumerate(record[f])]
        if isinstance(record[prompt], list) or isinstance(record[completion], list):
            kinds = {f: type(record[f]).__name__ for f in (prompt, completion)}
            raise InvalidRecordError(
                where,
                "prompt and completion differ",
                f"has a {kinds[prompt]} {prompt!r} and a {kinds[completion]} {completion!r}: give both as strings, or "
                "both as lists of messages (TRL's conversational form)",
            )
        return [
            (prompt, None, {"role": "user", "content": record[prompt]}),
            (completion, None, {"role": "assistant", "content": record[completion]}),
        ]
    # Alpaca: the optional input follows the instruction on a new line, as LLaMA-Factory's converter writes it.
    text = {
        ours: _content_of({"content": record[names[ours]]}, where, None, names[ours])
        for ours in ("system", "instruction", "input", "output")
        if record.get(names[ours]) is not None
    }
    turns: list[tuple[str | None, int | None, Any]] = []
    if text.get("system", "").strip():
        turns.append((names["system"], None, {"role": "system", "content": text["system"]}))
    history = record.get(names["history"])
    if history is not None:
        if not (isinstance(history, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in history)):
            raise InvalidRecordError(
                where,
                "history not pairs",
                "must be a list of [instruction, output] pairs, the earlier turns of the conversation",
                field=names["history"],
            )
        for index, (earlier, answer) in enumerate(history):
            turns.append((names["history"], 2 * index, {"role": "user", "content": earlier}))
            turns.append((names["history"], 2 * index + 1, {"role": "assistant", "content": answer}))
    if text.get("input", "").strip():
        label, prompt = f"{names['instruction']}+{names['input']}", f"{text['instruction']}\n{text['input']}"
    else:
        label, prompt = names["instruction"], text["instruction"]
    turns.append((label, None, {"role": "user", "content": prompt}))
    turns.append((names["output"], None, {"role": "assistant", "content": text["output"]}))
    return turns


def _role_of(message: Mapping[str, Any], where: str, index: int | None, field: str | None) -> str:
    raw = message.get("role", message.get("from"))
    if raw is None:
        raise InvalidRecordError(
            where, "missing role", f"has no 'role' (or ShareGPT 'from'); its keys are {sorted(message)}", index, field
        )
    role = _ROLE_ALIASES.get(str(raw).strip().lower())
    if role is None:
        guess = difflib.get_close_matches(str(raw).strip().lower(), _ROLE_ALIASES, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise InvalidRecordError(
            where,
            "unknown role",
            f"has unknown role {raw!r}; use 'system', 'user' or 'assistant' (aliases: human, model, gpt, bot){hint}",
            index,
            field,
        )
    return role


def _content_of(message: Mapping[str, Any], where: str, index: int | None, field: str | None) -> str:
    content = message["content"] if "content" in message else message.get("value")
    if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}, ...]
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRecordError(
                    where,
                    "unsupported content part",
                    f"has a content part of type {kind!r}; only {{'type': 'text', 'text': ...}} parts are supported",
                    index,
                    field,
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise InvalidRecordError(
            where,
            "content not text",
            f"content is {type(content).__name__}{'' if content is None else f' ({content!r})'}, expected a string",
            index,
            field,
        )
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON can carry "\ud800"; a tokenizer would fail deep inside
        raise InvalidRecordError(
            where,
            "lone surrogate",
            f"content has an unpaired surrogate U+{ord(content[err.start]):04X} at character {err.start}: the text "
            "was corrupted on its way into the file; repair or drop it",
            index,
            field,
        ) from None
    return content


def _reject_control_tokens(content: str, where: str, index: int | None, field: str | None) -> None:
    # Checked after normalisation, which could otherwise assemble a token from "<start_\u200dof_turn>".
    # Any family's tokens: the data does not know which Gemma it will train, and none may carry these in text.
    for token in reserved_tokens():
        if token in content:
            raise InvalidRecordError(
                where,
                "control token in content",
                f"content contains the Gemma control token {token!r}, which the tokenizer would read as a turn "
                "boundary or a media placeholder, not as text; remove it from the data",
                index,
                field,
            )


@renamed_arguments(normalizer="normalize")
def clean_conversation(
    record: Any,
    *,
    where: str = "record",
    data_format: str | None = None,
    columns: Mapping[str, str] | None = None,
    normalize: NormalizerConfig | None = DEFAULT_NORMALIZER,
    system_policy: Literal["fold", "error"] = "fold",
    same_role_policy: Literal["merge", "error"] = "merge",
    counts: CleaningCounts | None = None,
) -> Conversation:
    """Validate one record and return its messages as ``[{"role", "content"}]`` in Gemma's order.

    Reads any of :data:`DATA_FORMATS` (``data_format``; None detects it from the record's fields): persian-gk/ChatML
    ``{"messages": [{"role", "content"}]}``, ShareGPT ``{"conversations": [{"from", "value"}]}``, TRL's
    ``{"prompt", "completion"}`` (two strings, or two lists of messages) and Alpaca
    ``{"instruction", "input", "output"}`` (``input`` and ``system`` optional). ``columns`` maps those field names to
    the record's own, e.g. ``{"prompt": "question", "completion": "answer"}``. Roles are mapped to
    system/user/assistant. Then:

    - empty or whitespace-only messages are dropped;
    - a system message after the first position is folded into the next user turn (``system_policy="fold"``,
      the way Gemma's own template folds the first one) or rejected (``"error"``);
    - consecutive turns of the same role are joined with a blank line (``same_role_policy="merge"``) or
      rejected (``"error"``);
    - a trailing user turn, which nothing answers, is dropped.

    Raises :class:`InvalidRecordError` naming ``where`` and the message. The result may hold no model turn;
    the dataset drops such conversations and counts them.
    """
    counts = counts if counts is not None else CleaningCounts()
    names = check_columns(columns)
    found_format = _record_format(record, where, names, data_format)
    messages: list[dict[str, Any]] = []
    for source_field, index, message in _record_turns(record, found_format, names, where):
        if not isinstance(message, Mapping):
            raise InvalidRecordError(
                where,
                "message not an object",
                f"is a {type(message).__name__}, expected {{role, content}}",
                index,
                source_field,
            )
        role = _role_of(message, where, index, source_field)
        content = _content_of(message, where, index, source_field)
        if normalize is not None:
            content = normalize_persian(content, normalize)
        _reject_control_tokens(content, where, index, source_field)
        content = content.strip()
        if not content:
            counts.empty_messages_dropped += 1
            continue
        messages.append({"role": role, "content": content, "at": (index, source_field)})

    system = messages[0] if messages and messages[0]["role"] == "system" else None
    turns: list[dict[str, Any]] = []
    pending_system: list[str] = []
    for message in messages[1:] if system else messages:
        if message["role"] == "system":
            if system_policy == "error":
                raise InvalidRecordError(
                    where,
                    "misplaced system turn",
                    "is a system message after the first position; move it first or use system_policy='fold'",
                    *message["at"],
                )
            counts.system_turns_folded += 1
            pending_system.append(message["content"])
            continue
        if message["role"] == "user" and pending_system:
            message = {**message, "content": "\n\n".join([*pending_system, message["content"]])}
            pending_system.clear()
        if turns and turns[-1]["role"] == message["role"]:
            if same_role_policy == "error":
                raise InvalidRecordError(
                    where,
                    "consecutive same-role turns",
                    f"is a second {message['role']} turn in a row; merge them or use same_role_policy='merge'",
                    *message["at"],
                )
            counts.same_role_turns_merged += 1
            turns[-1] = {**turns[-1], "content": turns[-1]["content"] + "\n\n" + message["content"]}
            continue
        turns.append(message)

    if turns and turns[0]["role"] != "user":
        raise InvalidRecordError(
            where,
            "starts with a model turn",
            "the first turn after the system prompt is a model turn; Gemma's template needs a user turn first",
            *turns[0]["at"],
        )
    if turns and turns[-1]["role"] == "user":
        counts.trailing_user_turns_dropped += 1
        turns.pop()
    ordered = ([system] if system and turns else []) + turns
    return [{"role": m["role"], "content": m["content"]} for m in ordered]


# ------------------------------------------------------------------------------------------------ the dataset


@dataclass
class DatasetStats:
    """What loading kept and dropped, and how long the tokenized conversations are."""

    records_read: int
    kept: int
    dropped: dict[str, int]
    skipped_invalid: dict[str, int]
    cleaning: CleaningCounts
    truncated: int
    token_lengths: list[int] = field(repr=False)
    trained_tokens: int = 0
    tokens_per_persian_word: float | None = None
    data_format: str | None = None  # one of DATA_FORMATS
    data_format_detected: bool = True  # False: given as data_format=

    @property
    def mean_tokens(self) -> float:
        return statistics.fmean(self.token_lengths) if self.token_lengths else 0.0

    @property
    def median_tokens(self) -> float:
        return statistics.median(self.token_lengths) if self.token_lengths else 0.0

    @property
    def max_tokens(self) -> int:
        return max(self.token_lengths, default=0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "data_format": self.data_format,
            "data_format_detected": self.data_format_detected,
            "records_read": self.records_read,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "skipped_invalid": dict(self.skipped_invalid),
            "cleaning": vars(self.cleaning).copy(),
            "truncated": self.truncated,
            "tokens_mean": round(self.mean_tokens, 1),
            "tokens_median": self.median_tokens,
            "tokens_max": self.max_tokens,
            "trained_tokens": self.trained_tokens,
            "tokens_per_persian_word": self.tokens_per_persian_word,
        }

    def __str__(self) -> str:
        how = "detected" if self.data_format_detected else "given"
        lines = [
            f"data format             {self.data_format} ({how})",
            f"records read            {self.records_read}",
            f"conversations kept      {self.kept}",
        ]
        for reason, count in sorted({**self.dropped, **self.skipped_invalid}.items()):
            lines.append(f"  dropped: {reason:<22} {count}")
        for name, count in vars(self.cleaning).items():
            if count:
                lines.append(f"  repaired: {name.replace('_', ' '):<29} {count}")
        lines += [
            f"truncated to max_length {self.truncated}",
            f"tokens per conversation mean {self.mean_tokens:.1f}, median {self.median_tokens:g}, "
            f"max {self.max_tokens}",
            f"trained (model-turn) tokens {self.trained_tokens} of {sum(self.token_lengths)}",
        ]
        if self.tokens_per_persian_word is not None:
            lines.append(f"tokens per Persian word {self.tokens_per_persian_word:.2f}")
        return "\n".join(lines)


class PersianChatDataset(torch.utils.data.Dataset):
    """Persian chat conversations, tokenized with the Gemma chat template and labelled for model-turn training.

    ``source`` is a hub dataset name (e.g. ``"mshojaei77/persian-gk"``, loaded with ``datasets.load_dataset``),
    a local ``.jsonl``/``.json``/``.parquet`` file, a list of conversation records, or a ``datasets.Dataset``.
    Items are ``{"input_ids": [...], "labels": [...]}`` for :class:`~persian_qlora.GemmaChatCollator`; the cleaned
    conversations stay in :attr:`conversations` (aligned with the items) for evaluation.

    ``on_error="raise"`` (default) stops at the first malformed record with an :class:`InvalidRecordError`
    naming it; ``"skip"`` skips it, counts it in :attr:`stats` and logs a warning summary.
    ``normalize`` is a :class:`NormalizerConfig` (default: Persian characters, diacritics and spacing; digits
    kept) or ``None`` to keep text as it is.

    Records are in one of :data:`DATA_FORMATS` (see :func:`clean_conversation`): detected from the first record's
    fields, or given as ``data_format``; ``stats.data_format`` says which. A record in another format than the
    first is an :class:`InvalidRecordError` (reason ``"mixed formats"``). ``columns`` maps the format's field names
    to the dataset's own, e.g. ``{"instruction": "question", "output": "answer"}``.
    """

    def __init__(
        self,
        source: Any,
        tokenizer,
        *,
        split: str = "train",
        max_length: int = 4000,
        normalize: NormalizerConfig | None = DEFAULT_NORMALIZER,
        on_error: OnError = "raise",
        system_policy: Literal["fold", "error"] = "fold",
        same_role_policy: Literal["merge", "error"] = "merge",
        deduplicate: bool = True,
        data_format: DataFormat | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> None:
        check_data_format(data_format)
        names = check_columns(columns)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalize = normalize  # recorded beside the adapter, so that inference normalises prompts alike
        self.markers = GemmaTurnMarkers.from_tokenizer(tokenizer)

        cleaning = CleaningCounts()
        dropped: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        first_skip: str | None = None
        seen: set[tuple[tuple[str, str], ...]] = set()
        conversations: list[Conversation] = []
        records_read = 0
        found: tuple[str, str] | None = None  # the first record's format, and where it was read
        for where, record in iter_records(source, split):
            records_read += 1
            try:
                if isinstance(record, InvalidRecordError):
                    raise record
                this_format = _record_format(record, where, names, data_format)
                if found is None:
                    found = (this_format, where)
                    logger.info("data format: %s (%s %s)", this_format, "given" if data_format else "from", where)
                elif this_format != found[0]:
                    raise InvalidRecordError(
                        where,
                        "mixed formats",
                        f"is in the {this_format} format, but {found[1]} is in the {found[0]} format: one source holds "
                        "one format; "
                        f"convert or remove this record, or skip such records with on_error='skip'",
                    )
                conversation = clean_conversation(
                    record,
                    where=where,
                    data_format=this_format,
                    columns=columns,
                    normalize=normalize,
                    system_policy=system_policy,
                    same_role_policy=same_role_policy,
                    counts=cleaning,
                )
            except InvalidRecordError as err:
                if on_error == "raise":
                    raise
                skipped[err.reason] += 1
                first_skip = first_skip or str(err)
                continue
            if not any(m["role"] == "assistant" for m in conversation):
                dropped["no model turn"] += 1
                continue
            key = tuple((m["role"], m["content"]) for m in conversation)
            if deduplicate and key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            conversations.append(conversation)
        if skipped:
            logger.warning(
                "skipped %d invalid record(s) (%s); first: %s",
                sum(skipped.values()),
                ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()),
                first_skip,
            )

        self.conversations: list[Conversation] = []
        self.input_ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        truncated = 0
        for conversation, ids in zip(conversations, self._tokenize(conversations), strict=True):
            cut = len(ids) > max_length
            ids = ids[:max_length]
            labels = model_turn_labels(ids, self.markers)
            if all(label == IGNORE_INDEX for label in labels):
                # All -100 would give a NaN loss: never train on it.
                dropped["no trained tokens after truncation"] += 1
                continue
            truncated += cut
            self.conversations.append(conversation)
            self.input_ids.append(ids)
            self.labels.append(labels)

        if not self.input_ids:
            raise PersianQLoRAError(
                f"no usable conversations: read {records_read} record(s), dropped {dict(dropped)}, "
                f"skipped as invalid {dict(skipped)}"
            )
        self._stats = DatasetStats(
            records_read=records_read,
            kept=len(self.input_ids),
            dropped=dict(dropped),
            skipped_invalid=dict(skipped),
            cleaning=cleaning,
            truncated=truncated,
            token_lengths=[len(ids) for ids in self.input_ids],
            trained_tokens=sum(sum(label != IGNORE_INDEX for label in row) for row in self.labels),
            data_format=found[0] if found else data_format,
            data_format_detected=data_format is None,
        )

    @classmethod
    def bundled(cls, tokenizer, split: str = "train", **kwargs: Any) -> PersianChatDataset:
        """The bundled Persian chat corpus (``split="train"`` or ``"test"``)."""
        return cls(bundled_corpus_path(split), tokenizer, **kwargs)

    def _tokenize(self, conversations: list[Conversation], batch_size: int = 512) -> Iterator[list[int]]:
        """Render with the tokenizer's own chat template, then tokenize with exactly one BOS.

        The Gemma template writes ``<bos>`` itself, so we tokenize without special tokens (the tokenizer would add
        a second one); a template that writes none gets one prepended.
        """
        bos = self.tokenizer.bos_token_id
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start : start + batch_size]
            texts = self.tokenizer.apply_chat_template(batch, tokenize=False)
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                yield ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    @cached_property
    def stats(self) -> DatasetStats:
        """Counts, token lengths and tokens per Persian word (the latter computed on first access)."""
        words = [_PERSIAN_WORD.findall(m["content"]) for conv in self.conversations for m in conv]
        texts = [" ".join(w) for w in words if w]
        if texts:
            n_tokens = sum(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])
            self._stats.tokens_per_persian_word = n_tokens / sum(len(w) for w in words)
        return self._stats
