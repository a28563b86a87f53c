"""Persian text normalisation: one function, used by the dataset and (later) by the metrics.

Why our own and not hazm/parsivar: hazm adds ~385 MB and pins numpy 1.24 (it conflicts with ``datasets``), and
parsivar rewrites digits and inserts stray ZWNJ. This table-driven normaliser matched hazm on every character,
spacing and ZWNJ case we measured except inserting a *missing* ZWNJ inside a word, which needs word lists.
It uses the standard library only.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from persian_qlora._deprecation import renamed_arguments

__all__ = [
    "DEFAULT_NORMALIZER",
    "NORMALIZATION_FILE",
    "NormalizerConfig",
    "normalize_persian",
    "read_normalization",
    "save_normalization",
]

# Beside an adapter: how its training text was normalised, so that inference normalises prompts the same way.
NORMALIZATION_FILE = "text_normalization.json"

ZWNJ = "\u200c"

# Arabic code points that have a distinct Persian form.
_CHARACTER_MAP = str.maketrans(
    {
        "\u064a": "\u06cc",  # ي Arabic yeh -> ی
        "\u0649": "\u06cc",  # ى alef maksura -> ی
        "\u0643": "\u06a9",  # ك Arabic kaf -> ک
        "\u0640": None,  # ـ tatweel (kashida)
        "\u200d": None,  # zero-width joiner
        "\ufeff": None,  # BOM / zero-width no-break space
        "\u00a0": " ",  # no-break space
        "\u202f": ZWNJ,  # narrow no-break space, used by some keyboards for the half-space
        "\r": "\n",  # CR line ends become LF (CRLF is folded first)
        # Bidi controls (LRM, RLM, ALM, embeddings, overrides, isolates): invisible, and noise to a tokenizer.
        **dict.fromkeys(
            ["\u200e", "\u200f", "\u061c", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))]
        ),
        # C0 and C1 control characters other than tab and newline.
        **dict.fromkeys(
            [*map(chr, range(0x00, 0x09)), "\x0b", "\x0c", *map(chr, range(0x0E, 0x20)), *map(chr, range(0x7F, 0xA0))]
        ),
    }
)
# Harakat: damma/kasra tanwin, fatha, damma, kasra, shadda, sukun, superscript alef. The fatha tanwin (U+064B) is
# kept: standard Persian spelling writes it in adverbs such as معمولاً and دقیقاً.
_DIACRITICS = re.compile("[\u064c-\u0652\u0670]")
# Arabic presentation forms (e.g. the ligature ﻻ) decompose to plain letters under NFKC; we apply NFKC to these
# ranges only, because NFKC on the whole text would also rewrite digits and punctuation.
_PRESENTATION_FORMS = re.compile("[\ufb50-\ufdff\ufe70-\ufefe]+")

_DIGITS = {
    "fa": str.maketrans("0123456789٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹" * 2),
    "latin": str.maketrans("۰۱۲۳۴۵۶۷۸۹٠١٢٣٤٥٦٧٨٩", "0123456789" * 2),
}

# Code (fenced blocks and inline spans) is never touched: its spacing and characters are meaningful.
_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
# A quoted span is often a word cited as written («می خواهم» in a spelling lesson): no ZWNJ is inserted there.
_QUOTED = re.compile(r"(«[^«»\n]*»)")
_ARABIC_SCRIPT = "\u0600-\u06ff"

_ZWNJ_RUNS = re.compile(ZWNJ + "{2,}")
# A ZWNJ next to a space, or at the edge of a word, joins nothing.
_STRAY_ZWNJ = re.compile(rf"(?<!\S){ZWNJ}|{ZWNJ}(?!\S)")
# Spacing rules fire only next to Persian text, so English and code-like prose ("git add .") keep their spacing.
_SPACE_RUNS = re.compile(rf"(?<=[{_ARABIC_SCRIPT}])[ \t]{{2,}}|(?<=\S)[ \t]{{2,}}(?=[{_ARABIC_SCRIPT}])")
_SPACE_BEFORE_PUNCT = re.compile(rf"(?<=\S)[ \t]+([،؛؟»])|(?<=[{_ARABIC_SCRIPT}])[ \t]+([.!:])(?!\S)")
_SPACE_AFTER_OPENER = re.compile(r"«[ \t]+")
_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n)")
# The verbal prefixes می/نمی written apart from their verb, and plural/superlative suffixes written apart from
# their noun or adjective, take a ZWNJ in standard orthography (می خواهم -> می‌خواهم, کتاب ها -> کتاب‌ها).
_PERSIAN_LETTER = "[\u0621-\u063a\u0641-\u064a\u067e\u0686\u0698\u06a9\u06af\u06cc\u0622\u0626]"
_PREFIX_APART = re.compile(rf"(?<![^\s(])(ن?می)[ ]+(?={_PERSIAN_LETTER})")
_SUFFIX_APART = re.compile(rf"(?<={_PERSIAN_LETTER})[ ]+(ها|های|هایی|هایم|هایت|هایش|ترین|تری)(?=[\s.،؛؟!:)]|$)")


@dataclass(frozen=True)
class NormalizerConfig:
    """What :func:`normalize_persian` changes. Digits are left alone unless ``digits`` asks."""

    characters: bool = True  # ي/ى -> ی, ك -> ک, tatweel, ZWJ, BOM, bidi and control characters, forms
    diacritics: bool = True
    spacing: bool = True  # spaces, ZWNJ, punctuation spacing, می/ها half-spaces
    digits: Literal["fa", "latin"] | None = None


DEFAULT_NORMALIZER = NormalizerConfig()


def save_normalization(directory: str | Path, config: NormalizerConfig | None) -> Path:
    """Record ``config`` (None: the text was not normalised) in ``directory``'s ``text_normalization.json``."""
    path = Path(directory) / NORMALIZATION_FILE
    path.write_text(json.dumps({"normalizer": None if config is None else asdict(config)}) + "\n", encoding="utf-8")
    return path


def read_normalization(
    directory: str | Path, default: NormalizerConfig | None = DEFAULT_NORMALIZER
) -> NormalizerConfig | None:
    """The normalisation recorded in ``directory`` (None: none was applied), or ``default`` when none is recorded."""
    path = Path(directory) / NORMALIZATION_FILE
    if not path.exists():
        return default
    recorded = json.loads(path.read_text(encoding="utf-8"))["normalizer"]
    return None if recorded is None else NormalizerConfig(**recorded)


@renamed_arguments(config="normalize")
def normalize_persian(text: str, normalize: NormalizerConfig = DEFAULT_NORMALIZER) -> str:
    """Return ``text`` in standard Persian orthography as ``normalize`` asks, leaving code spans as they are.

    ``normalize`` is the same :class:`NormalizerConfig` argument, by the same name, as the dataset's and the
    metrics'. Idempotent: normalising twice changes nothing more.
    """
    pieces = _CODE.split(text)
    codes = _CODE.findall(text)
    out = [_normalize_prose(pieces[0], normalize)]
    for code, prose in zip(codes, pieces[1:], strict=True):
        out += [code, _normalize_prose(prose, normalize)]
    return "".join(out)


def _normalize_prose(text: str, config: NormalizerConfig) -> str:
    if config.characters:
        text = _PRESENTATION_FORMS.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
        text = text.replace("\r\n", "\n").translate(_CHARACTER_MAP)
    if config.diacritics:
        text = _DIACRITICS.sub("", text)
    if config.digits is not None:
        text = text.translate(_DIGITS[config.digits])
    if config.spacing:
        text = _ZWNJ_RUNS.sub(ZWNJ, text)
        text = _STRAY_ZWNJ.sub("", text)
        text = _SPACE_RUNS.sub(" ", text)
        # Odd pieces of the split are the quoted spans, left without ZWNJ insertion.
        text = "".join(
            piece if i % 2 else _SUFFIX_APART.sub(rf"{ZWNJ}\1", _PREFIX_APART.sub(rf"\1{ZWNJ}", piece))
            for i, piece in enumerate(_QUOTED.split(text))
        )
        text = _SPACE_BEFORE_PUNCT.sub(lambda m: m.group(1) or m.group(2), text)
        text = _SPACE_AFTER_OPENER.sub("«", text)
        text = _TRAILING_SPACE.sub("", text)
    return text
