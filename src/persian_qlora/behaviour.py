"""How generated replies behave, beside how much they overlap the references: the signs of learning and collapse.

BLEU, ROUGE-L and chrF count overlap with the references, and a model that repeats a frequent word ("در در در …")
can raise them a little. These measures tell such a model apart from one that learned:

- **turn-end rate**: the share of replies that end with the turn end (``<end_of_turn>``, Gemma 4's ``<turn|>``) or
  ``<eos>`` before the token limit;
- **repetition**: the share of a reply's word 4-grams that repeat an earlier 4-gram of the same reply, averaged
  over the replies that have any 4-gram (the "seq-rep-4" of Welleck et al., 2020); 0 for varied text, near 1
  for a loop;
- **distinct-2**: distinct word bigrams over all bigrams of all replies (Li et al., 2016); low when replies
  loop or say the same thing to every prompt;
- **Persian letters**: the share of Persian-script letters among all letters of all replies;
- **length**: mean words per reply, against the references' mean.

Words are :class:`~persian_qlora.metrics.PersianWordTokenizer`'s, after the same normalisation as the overlap
metrics, so a ZWNJ-joined word (``کتاب‌ها``) is one word and punctuation is no word. :func:`verdict` weighs all of
these with the overlap scores and perplexity.

What counts as a Persian letter: the 32 letters of the Persian alphabet, آ, the hamza forms Persian spelling uses
(ء أ إ ؤ ئ) and ۀ. Arabic's own forms ي ى ك and ة, and the letters of other Arabic-script languages (Urdu ے ٹ ں),
are letters but not Persian ones. Letters are Unicode categories Lu, Ll, Lt and Lo: digits, punctuation, ZWNJ,
diacritics and tatweel are not letters. :func:`behaviour_scores` normalises first (ي → ی, ك → ک, as for BLEU),
so a reply typed on an Arabic keyboard layout is not held against the model; :func:`persian_letter_share` on raw
text counts the characters as written.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from persian_qlora.metrics import PersianWordTokenizer
from persian_qlora.normalize import DEFAULT_NORMALIZER, NormalizerConfig, normalize_persian

__all__ = [
    "PERSIAN_LETTERS",
    "STILL_LOOPING_MARGIN",
    "BehaviourScores",
    "Verdict",
    "behaviour_scores",
    "distinct_n",
    "persian_letter_share",
    "problems",
    "repeated_ngram_share",
    "turn_end_rate",
    "verdict",
]

PERSIAN_LETTERS = frozenset("ابپتثجچحخدذرزژسشصضطظعغفقکگلمنوهی" + "آ" + "ءأإؤئ" + "ۀ")
_LETTER_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo"})  # not Lm: tatweel is a modifier letter
_WORDS = PersianWordTokenizer()


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(text: str, n: int = 4) -> float | None:
    """The share of the word ``n``-grams of ``text`` that repeat an earlier one; None with fewer than ``n`` words."""
    grams = _ngrams(_WORDS.tokenize(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else None


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct word ``n``-grams over all ``n``-grams of all ``texts`` (pooled); None when there is none."""
    grams = [gram for text in texts for gram in _ngrams(_WORDS.tokenize(text), n)]
    return len(set(grams)) / len(grams) if grams else None


def persian_letter_share(texts: Sequence[str]) -> float | None:
    """Persian-script letters over all letters of ``texts``, as written (pooled); None when there is no letter."""
    letters = [c for text in texts for c in text if unicodedata.category(c) in _LETTER_CATEGORIES]
    return sum(c in PERSIAN_LETTERS for c in letters) / len(letters) if letters else None


def turn_end_rate(ended: Sequence[bool]) -> float | None:
    """The share of replies that ended their turn (on ``<end_of_turn>`` or ``<eos>``) before the token limit."""
    return sum(map(bool, ended)) / len(ended) if ended else None


@dataclass(frozen=True)
class BehaviourScores:
    """Behaviour of a set of replies; shares are 0-1, lengths in words. None: not defined for these replies."""

    turn_end_rate: float | None
    repetition: float | None  # mean share of repeated word 4-grams per reply
    distinct_2: float | None
    persian_letters: float | None
    mean_words: float
    reference_words: float

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def behaviour_scores(
    replies: Sequence[str],
    references: Sequence[str],
    ended: Sequence[bool] | None = None,
    *,
    normalize: NormalizerConfig | None = DEFAULT_NORMALIZER,
) -> BehaviourScores:
    """Every behaviour measure of ``replies`` (``ended``: whether each stopped on a stop token, if known).

    Replies and references go through ``normalize`` first, as in :func:`~persian_qlora.metrics.corpus_scores`.
    """
    if len(replies) != len(references) or (ended is not None and len(ended) != len(replies)):
        raise ValueError(f"{len(replies)} replies, {len(references)} references, {len(ended or [])} turn ends")
    if not replies:
        raise ValueError("nothing to score: no replies")
    if normalize is not None:
        replies = [normalize_persian(t, normalize) for t in replies]
        references = [normalize_persian(t, normalize) for t in references]
    shares = [s for s in map(repeated_ngram_share, replies) if s is not None]
    return BehaviourScores(
        turn_end_rate=turn_end_rate(ended) if ended is not None else None,
        repetition=sum(shares) / len(shares) if shares else None,
        distinct_2=distinct_n(replies, 2),
        persian_letters=persian_letter_share(replies),
        mean_words=sum(len(_WORDS.tokenize(t)) for t in replies) / len(replies),
        reference_words=sum(len(_WORDS.tokenize(t)) for t in references) / len(references),
    )


# --- the verdict -------------------------------------------------------------------------------------------------

# When replies have a problem. Conventions, not significance tests: the last model turns of the bundled corpus score
# 0.001 repetition, distinct-2 0.82 (train) and 0.92 (test), and 94-96 % Persian letters (the rest is English/code).
LOOPING = 0.5  # repetition at or above: half the 4-grams of a reply repeat
LOW_DIVERSITY = 0.2  # distinct-2 below
RARE_TURN_END = 0.1  # turn-end rate below
NOT_PERSIAN = 0.5  # Persian letters below
NEARLY_EMPTY = 0.1  # mean words below this share of the references'
# The smallest change worth a word: smaller moves are within what a few of ~50 replies or another seed change.
MOVES = {
    "bleu": 0.5,
    "rouge_l": 1.0,
    "chrf": 1.0,
    "turn_end_rate": 0.1,
    "repetition": 0.1,
    "distinct_2": 0.05,
    "persian_letters": 0.1,
}
PERPLEXITY_MOVE = 0.02  # relative
# Replies whose repetition exceeds the references' by this much still loop: such a run is never "improved".
STILL_LOOPING_MARGIN = MOVES["repetition"]
LENGTH_MOVE = 0.2  # of the references' mean length, in how far the replies' mean is from it
# Pooled distinct-2 falls as replies grow longer (common bigrams recur), so a move counts only between replies
# whose mean lengths are within this factor; below LOW_DIVERSITY it is a problem at any length.
DISTINCT_LENGTH_RATIO = 1.5
_NAMES = {
    "bleu": "BLEU-4",
    "rouge_l": "ROUGE-L",
    "chrf": "chrF",
    "turn_end_rate": "turn-end rate",
    "repetition": "repetition",
    "distinct_2": "distinct-2",
    "persian_letters": "Persian letters",
}
_LOWER_IS_BETTER = {"repetition"}
_SHARES = {"turn_end_rate", "repetition", "persian_letters"}
_OVERLAP = ("bleu", "rouge_l", "chrf")


def _get(scores: Mapping[str, Any], key: str) -> float | None:
    value = scores.get(key)
    return None if value is None else float(value)


def problems(scores: Mapping[str, Any]) -> dict[str, str]:
    """What is wrong with one evaluation's replies, each as a phrase: ``{"looping": "replies loop …", …}``."""
    found: dict[str, str] = {}
    words, reference = _get(scores, "mean_words"), _get(scores, "reference_words")
    if words is not None and reference and words < NEARLY_EMPTY * reference:
        found["empty"] = f"replies are (nearly) empty ({words:.1f} words on average, the references {reference:.1f})"
        return found  # nothing else can be read from empty replies
    repetition, diversity = _get(scores, "repetition"), _get(scores, "distinct_2")
    if repetition is not None and repetition >= LOOPING:
        found["looping"] = f"replies loop on a word or short phrase ({repetition:.0%} of their 4-grams are repeats)"
    if diversity is not None and diversity < LOW_DIVERSITY:
        found["low_diversity"] = f"lexical diversity collapses (distinct-2 {diversity:.2f})"
    ended = _get(scores, "turn_end_rate")
    if ended is not None and ended < RARE_TURN_END:
        found["no_turn_end"] = (
            "replies never end their turn" if ended == 0 else f"replies rarely end their turn ({ended:.0%})"
        ) + " and run to the token limit"
    persian = _get(scores, "persian_letters")
    if persian is not None and persian < NOT_PERSIAN:
        found["not_persian"] = f"replies are mostly not Persian script ({persian:.0%} Persian letters)"
    return found


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The moves worth a word, as phrases by metric: (gains, losses)."""
    gains: dict[str, str] = {}
    losses: dict[str, str] = {}
    words_before, words_after = _get(before, "mean_words"), _get(after, "mean_words")
    comparable_lengths = bool(words_before and words_after) and (
        max(words_before, words_after) <= DISTINCT_LENGTH_RATIO * min(words_before, words_after)
    )
    for key, step in MOVES.items():
        old, new = _get(before, key), _get(after, key)
        if old is None or new is None or abs(new - old) < step or (key == "distinct_2" and not comparable_lengths):
            continue
        share = key in _SHARES
        phrase = f"{_NAMES[key]} {old:.0%} → {new:.0%}" if share else f"{_NAMES[key]} {old:.2f} → {new:.2f}"
        better = new < old if key in _LOWER_IS_BETTER else new > old
        (gains if better else losses)[key] = phrase
    old, new = _get(before, "perplexity"), _get(after, "perplexity")
    if old and new and abs(new - old) >= PERPLEXITY_MOVE * old:
        (gains if new < old else losses)["perplexity"] = f"perplexity {old:.2f} → {new:.2f}"
    old, new, reference = _get(before, "mean_words"), _get(after, "mean_words"), _get(after, "reference_words")
    if old is not None and new is not None and reference:
        gap_old, gap_new = abs(old - reference) / reference, abs(new - reference) / reference
        if abs(gap_new - gap_old) >= LENGTH_MOVE:
            phrase = f"mean length {old:.1f} → {new:.1f} words (references {reference:.1f})"
            (gains if gap_new < gap_old else losses)["length"] = phrase
    return gains, losses


@dataclass(frozen=True)
class Verdict:
    """``label`` is one of "improved", "learned, but still loops", "degenerate", "mixed", "worse", "no change";
    ``summary`` says why."""

    label: str
    summary: str


def verdict(
    before: Mapping[str, Any], after: Mapping[str, Any], *, reference_repetition: float | None = None
) -> Verdict:
    """Judge one model against its starting point from their evaluation scores (as ``compare`` records them).

    ``reference_repetition`` is the references' own repetition (0 when not given).

    The rules, in order:

    1. **degenerate**: the replies after show a problem (:func:`problems`: looping, collapsed diversity, no turn
       end, not Persian, empty) that they did not show before, or they loop and repetition rose by at least
       ``MOVES["repetition"]``. Gains in BLEU, ROUGE-L, chrF or perplexity do not outweigh this: repeating
       frequent words earns some overlap, and perplexity scores the references, not what the model generates.
    2. otherwise each metric that moved by at least its step in ``MOVES`` (perplexity: ``PERPLEXITY_MOVE``
       relative; length: towards or away from the references' mean by ``LENGTH_MOVE`` of it; distinct-2 only
       between replies of similar length, see ``DISTINCT_LENGTH_RATIO``) is a gain or a loss: **improved** with
       gains only, **worse** with losses only, **mixed** with both, **no change** with neither.
    3. gains only, but the replies' repetition still exceeds ``reference_repetition`` by ``STILL_LOOPING_MARGIN``
       or more: **learned, but still loops**, never "improved": the overlap can rise while the replies loop.

    Problems the replies had before and still have are named in the summary ("still: …").
    """
    old_problems, new_problems = problems(before), problems(after)
    gains, losses = _changes(before, after)
    appeared = {k: v for k, v in new_problems.items() if k not in old_problems}
    if "looping" in new_problems and "repetition" in losses:
        appeared["looping"] = new_problems["looping"]
    standing = [text for key, text in new_problems.items() if key not in appeared]
    still = f"; still: {'; '.join(standing)}" if standing else ""
    if appeared:
        overlap = [gains[k] for k in (*_OVERLAP, "perplexity") if k in gains]
        caveat = f"; {' and '.join(overlap)} do not make up for it" if overlap else ""
        return Verdict("degenerate", f"{'; '.join(appeared.values())}{caveat}{still}")
    if gains and losses:
        return Verdict("mixed", f"up: {', '.join(gains.values())}; down: {', '.join(losses.values())}{still}")
    if gains:
        reference = reference_repetition or 0.0
        repetition = _get(after, "repetition")
        if repetition is not None and repetition >= reference + STILL_LOOPING_MARGIN:
            loops = f"; replies still loop ({repetition:.0%} of their 4-grams repeat; the references' {reference:.0%})"
            loops = "" if "looping" in new_problems else loops  # "still: replies loop …" says it already
            return Verdict("learned, but still loops", f"{', '.join(gains.values())}{loops}{still}")
        return Verdict("improved", f"{', '.join(gains.values())}{still}")
    if losses:
        return Verdict("worse", f"{', '.join(losses.values())}{still}")
    return Verdict("no change", f"no metric moved by more than its noise step{still}")
