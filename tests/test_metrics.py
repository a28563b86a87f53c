"""Persian-correct BLEU-4, ROUGE-L and chrF."""

import pytest
from sacrebleu.metrics import BLEU

from persian_qlora.metrics import PersianWordTokenizer, corpus_scores, sentence_scores
from persian_qlora.normalize import normalize_persian

REF = "من امروز به مدرسه رفتم."
PAIRS = (
    ["«سلام»، حالت چطوره؟", "کتاب‌ها را روی میز گذاشتم.", "پایتخت ایران تهران است."],
    ["«سلام»، حالت خوبه؟", "کتاب‌ها را روی قفسه گذاشتم.", "پایتخت ایران شهر تهران است."],
)


def test_rouge_l_of_a_persian_string_against_itself_is_one():
    assert sentence_scores(REF, REF)["rouge_l"] == pytest.approx(100.0)
    assert corpus_scores([REF], [REF]).rouge_l == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("prediction", "expected_f1"),
    [
        ("من دیروز به مدرسه رفتم.", 0.8),  # LCS من به مدرسه رفتم = 4 of 5 and 5: P = R = 0.8
        ("من به مدرسه رفتم.", 2 * 1.0 * 0.8 / 1.8),  # LCS 4: P = 4/4, R = 4/5
        ("رفتم مدرسه به امروز من", 0.2),  # reversed: LCS 1 of 5
    ],
)
def test_rouge_l_matches_the_hand_computed_lcs(prediction, expected_f1):
    score = sentence_scores(prediction, REF)["rouge_l"]
    assert 0 < score < 100
    assert score == pytest.approx(100 * expected_f1)


def test_word_tokenizer_keeps_zwnj_inside_words_and_numbers_whole():
    tokens = PersianWordTokenizer().tokenize("«کتاب‌ها» ۱۲۰٬۰۰۰ تومان، 3.5 Kg؟\u200c")
    assert tokens == ["کتاب\u200cها", "۱۲۰٬۰۰۰", "تومان", "3.5", "kg"]


def test_bleu_is_sacrebleu_intl_on_the_normalised_strings():
    predictions, references = PAIRS
    expected = BLEU(tokenize="intl").corpus_score(
        [normalize_persian(p) for p in predictions], [[normalize_persian(r) for r in references]]
    )
    scores = corpus_scores(predictions, references)
    assert scores.bleu == pytest.approx(expected.score)
    assert "tok:intl" in scores.bleu_signature and scores.normalized
    assert 0 < scores.bleu < 100 and 0 < scores.chrf < 100


def test_scores_ignore_arabic_yeh_and_kaf_when_normalising():
    predictions, references = PAIRS
    arabic = [p.replace("ی", "ي").replace("ک", "ك") for p in predictions]
    assert arabic != predictions
    assert corpus_scores(arabic, references).as_dict() == corpus_scores(predictions, references).as_dict()
    raw = corpus_scores(arabic, references, normalize=None)
    assert raw.bleu < corpus_scores(predictions, references).bleu and not raw.normalized


def test_intl_splits_persian_punctuation_that_13a_glues():
    prediction, reference = "«سلام»، چطوری؟", "«سلام» چطوری"
    assert corpus_scores([prediction], [reference]).bleu > BLEU().corpus_score([prediction], [[reference]]).score


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        corpus_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="nothing to score"):
        corpus_scores([], [])
