"""BLEU-4, ROUGE-L and chrF that are correct for Persian script, at sentence and corpus level.

- BLEU-4 is sacrebleu's corpus BLEU with ``tokenize="intl"``: the default ``13a`` leaves ، ؟ ؛ « » glued to the
  words (``«سلام»،`` is one token), which undercounts matches.
- ROUGE-L uses ``rouge-score`` with a Persian-aware tokenizer: its default tokenizer keeps only ``[a-z0-9]``,
  so every Persian string scores 0.0, even against itself.
- chrF (sacrebleu) is character-based and script-agnostic.

Predictions and references go through the same :func:`normalize_persian` as the training data (unless
``normalize=None``), so ي/ی or a missing ZWNJ does not count as an error. We call sacrebleu and rouge-score
directly: ``evaluate.load("bleu"|"rouge"|"sacrebleu")`` fetches its script from the hub and fails offline.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from persian_qlora.normalize import DEFAULT_NORMALIZER, NormalizerConfig, normalize_persian

__all__ = ["CorpusScores", "PersianWordTokenizer", "corpus_scores", "sentence_scores"]


class PersianWordTokenizer:
    """Words for ROUGE: split on whitespace and punctuation, keep ZWNJ inside words and numbers whole.

    ``\\w`` is Unicode-aware, so Persian letters and digits are kept; Latin letters are lowercased, as
    rouge-score's own tokenizer does; a ZWNJ at a word's edge is dropped.
    """

    _WORD = re.compile(r"\d+(?:[٬٫,.]\d+)*|[\w\u200c]+")

    def tokenize(self, text: str) -> list[str]:
        words = (w.strip("\u200c") for w in self._WORD.findall(text.lower()))
        return [w for w in words if w]


@dataclass(frozen=True)
class CorpusScores:
    """Corpus-level scores on a 0-100 scale (ROUGE-L is the mean sentence F1, as rouge-score reports it)."""

    bleu: float
    rouge_l: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    normalized: bool
    n: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _prepare(texts: Sequence[str], normalize: NormalizerConfig | None) -> list[str]:
    return [normalize_persian(t, normalize).strip() if normalize is not None else t.strip() for t in texts]


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=PersianWordTokenizer())


def sentence_scores(
    prediction: str, reference: str, *, normalize: NormalizerConfig | None = DEFAULT_NORMALIZER
) -> dict[str, float]:
    """BLEU (with effective order, as sentence BLEU needs), ROUGE-L F1 and chrF of one pair, 0-100."""
    from sacrebleu.metrics import BLEU, CHRF

    (pred,), (ref,) = _prepare([prediction], normalize), _prepare([reference], normalize)
    return {
        "bleu": BLEU(tokenize="intl", effective_order=True).sentence_score(pred, [ref]).score,
        "rouge_l": 100 * _rouge_scorer().score(ref, pred)["rougeL"].fmeasure,
        "chrf": CHRF().sentence_score(pred, [ref]).score,
    }


def corpus_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    normalize: NormalizerConfig | None = DEFAULT_NORMALIZER,
) -> CorpusScores:
    """Corpus BLEU-4 (sacrebleu ``intl``), mean ROUGE-L F1 and corpus chrF, each 0-100, with sacrebleu signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    preds, refs = _prepare(predictions, normalize), _prepare(references, normalize)
    bleu, chrf = BLEU(tokenize="intl"), CHRF()
    bleu_score = bleu.corpus_score(preds, [refs])
    chrf_score = chrf.corpus_score(preds, [refs])
    scorer = _rouge_scorer()
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)) / len(preds)
    return CorpusScores(
        bleu=bleu_score.score,
        rouge_l=100 * rouge,
        chrf=chrf_score.score,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        normalized=normalize is not None,
        n=len(preds),
    )
