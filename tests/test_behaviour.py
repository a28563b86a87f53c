"""Behaviour measures on hand-made replies, and the verdict on hand-made report data."""

import pytest

from persian_qlora.behaviour import (
    behaviour_scores,
    distinct_n,
    persian_letter_share,
    problems,
    repeated_ngram_share,
    turn_end_rate,
    verdict,
)
from persian_qlora.metrics import corpus_scores

ZWNJ = "\u200c"


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("امروز هوا خیلی خوب است و ما به پارک رفتیم.", 0.0),
        ("در در در در در", 0.5),  # 2 four-grams, both (در در در در): 1 distinct
        ("در در در در در در در در", 0.8),  # 5 four-grams, 1 distinct
        ("سلام، سلام؛ سلام. «سلام» سلام؟", 0.5),  # punctuation is no word
        (f"کتاب{ZWNJ}ها را خواندم و کتاب{ZWNJ}ها را خواندم و", 0.2),  # 8 words, not 10: 5 four-grams, 4 distinct
    ],
)
def test_repeated_ngram_share_counts_repeats_of_earlier_four_grams(text, share):
    assert repeated_ngram_share(text) == pytest.approx(share)


@pytest.mark.parametrize("text", ["", "سلام", "من می\u200cخواهم بروم"])  # 0, 1 and 3 words: no 4-gram
def test_a_reply_shorter_than_four_words_has_no_repetition_figure(text):
    assert repeated_ngram_share(text) is None


def test_distinct_2_pools_the_bigrams_of_every_reply():
    assert distinct_n(["من به خانه", "من به خانه"]) == pytest.approx(2 / 4)
    assert distinct_n(["من به خانه رفتم", "تو به مدرسه"]) == pytest.approx(5 / 5)
    assert distinct_n(["سلام", ""]) is None


@pytest.mark.parametrize(
    ("texts", "share"),
    [
        (["سلام"], 1.0),
        (["كتاب"], 3 / 4),  # Arabic kaf, as written
        (["علي"], 2 / 3),  # Arabic yeh
        (["مدرسة"], 4 / 5),  # teh marbuta is Arabic, not Persian
        (["مسئله، رأی، مؤسسه، آب، جزء، خانۀ"], 1.0),  # hamza forms, alef madda and heh with yeh above are Persian
        ([f"می{ZWNJ}خواهم"], 1.0),  # the ZWNJ is no letter
        (["سـلام کِتاب"], 1.0),  # nor tatweel nor a kasra
        (["hello سلام"], 4 / 9),
        (["۱۲۳ abc"], 0.0),  # digits are no letters
        (["ٹھیک ہے"], 2 / 6),  # Urdu: ٹ ھ ہ ے are Arabic-script letters but not Persian; ی and ک are shared
        (["سلام", "hi"], 4 / 6),  # pooled over replies
    ],
)
def test_persian_letter_share_counts_persian_script_letters_among_all_letters(texts, share):
    assert persian_letter_share(texts) == pytest.approx(share)


def test_text_without_letters_has_no_persian_share():
    assert persian_letter_share(["", "۱۲۳، ۴۵۶؟ 42"]) is None


def test_turn_end_rate_is_the_share_of_replies_that_stopped():
    assert turn_end_rate([True, False, True, True]) == pytest.approx(0.75)
    assert turn_end_rate([]) is None


def test_behaviour_scores_normalise_like_the_overlap_metrics():
    replies, references = ["كتاب خوبي است"], ["کتاب خوبی است و من آن را خواندم"]
    assert behaviour_scores(replies, references).persian_letters == pytest.approx(1.0)
    assert behaviour_scores(replies, references, normalize=None).persian_letters == pytest.approx(9 / 11)


def test_behaviour_scores_of_hand_made_replies():
    replies = ["در در در در در در در در", "", f"من می{ZWNJ}خواهم بروم"]
    references = ["من امروز به بازار رفتم", "سلام", "خیلی ممنون"]
    scores = behaviour_scores(replies, references, [False, True, True])
    assert scores.turn_end_rate == pytest.approx(2 / 3)
    assert scores.repetition == pytest.approx(0.8)  # only the first reply has a 4-gram
    assert scores.distinct_2 == pytest.approx(3 / 9)  # (در در) once among 7, (من می‌خواهم), (می‌خواهم بروم)
    assert scores.mean_words == pytest.approx((8 + 0 + 3) / 3)
    assert scores.reference_words == pytest.approx((5 + 1 + 2) / 3)
    assert behaviour_scores(["", ""], ["a", "b"]).as_dict() == {
        "turn_end_rate": None,
        "repetition": None,
        "distinct_2": None,
        "persian_letters": None,
        "mean_words": 0.0,
        "reference_words": 1.0,
    }


def test_behaviour_scores_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="2 replies, 1 references"):
        behaviour_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="1 turn ends"):
        behaviour_scores(["a", "b"], ["a", "b"], [True])


# --- the verdict, on hand-made evaluation scores as compare records them ------------------------------------------

HEALTHY = {
    "bleu": 1.0,
    "rouge_l": 8.0,
    "chrf": 12.0,
    "turn_end_rate": 0.3,
    "repetition": 0.05,
    "distinct_2": 0.7,
    "persian_letters": 0.95,
    "mean_words": 40.0,
    "reference_words": 56.0,
}


def test_learning_is_improved():
    after = {**HEALTHY, "bleu": 3.2, "chrf": 19.5, "turn_end_rate": 0.8, "mean_words": 50.0}
    result = verdict(HEALTHY, after)
    assert result.label == "improved"
    assert "BLEU-4 1.00 → 3.20" in result.summary and "turn-end rate 30% → 80%" in result.summary


def test_collapse_is_degenerate_even_when_bleu_rises():
    after = {**HEALTHY, "bleu": 1.1, "chrf": 11.5, "turn_end_rate": 0.0, "repetition": 0.9, "distinct_2": 0.04}
    result = verdict(HEALTHY, after)
    assert result.label == "degenerate"
    assert "loop on a word or short phrase" in result.summary and "never end their turn" in result.summary


def test_a_perplexity_gain_does_not_hide_degeneration():
    before = {**HEALTHY, "perplexity": 80.0}
    after = {**HEALTHY, "perplexity": 40.0, "repetition": 0.7}
    result = verdict(before, after)
    assert result.label == "degenerate" and "perplexity 80.00 → 40.00" in result.summary


def test_looping_that_gets_sharply_worse_is_degenerate():
    before, after = {**HEALTHY, "repetition": 0.55}, {**HEALTHY, "repetition": 0.95, "bleu": 2.0}
    assert verdict(before, after).label == "degenerate"
    still_looping = verdict(before, {**after, "repetition": 0.6}, reference_repetition=0.001)
    assert still_looping.label == "learned, but still loops"  # BLEU rose, but the replies loop as much as before
    assert "still: replies loop on a word or short phrase (60% of their 4-grams are repeats)" in still_looping.summary
    assert "replies still loop" not in still_looping.summary  # said once


def test_gains_with_repetition_beyond_the_references_are_never_improved():
    before = {**HEALTHY, "repetition": 0.3}  # below LOOPING, yet far above the references
    after = {**before, "bleu": 3.0}
    assert verdict(before, after).label == "learned, but still loops"
    assert "replies still loop (30% of their 4-grams repeat; the references' 0%)" in verdict(before, after).summary
    assert verdict(before, after, reference_repetition=0.25).label == "improved"


def test_small_moves_are_no_change():
    after = {**HEALTHY, "bleu": 1.3, "chrf": 12.6, "rouge_l": 8.5, "turn_end_rate": 0.35, "repetition": 0.08}
    assert verdict(HEALTHY, after) == verdict(HEALTHY, HEALTHY)
    assert verdict(HEALTHY, after).label == "no change"


def test_gains_and_losses_together_are_mixed():
    after = {**HEALTHY, "bleu": 2.5, "chrf": 9.0}
    result = verdict(HEALTHY, after)
    assert result.label == "mixed" and "up: BLEU-4" in result.summary and "down: chrF" in result.summary
    assert verdict(HEALTHY, {**HEALTHY, "chrf": 9.0}).label == "worse"


def test_distinct_2_moves_count_only_between_replies_of_similar_length():
    shorter = {**HEALTHY, "mean_words": 15.0, "distinct_2": 0.76}
    longer = {**HEALTHY, "mean_words": 43.0, "distinct_2": 0.57, "chrf": 20.0}
    assert verdict(shorter, longer).label == "improved"  # longer replies repeat common bigrams more
    same_length = {**longer, "mean_words": 15.0}
    result = verdict(shorter, same_length)
    assert result.label == "mixed" and "distinct-2 0.76 → 0.57" in result.summary
    assert problems({**longer, "distinct_2": 0.1}) == {"low_diversity": "lexical diversity collapses (distinct-2 0.10)"}


def test_a_problem_the_base_already_had_is_named_but_is_no_degeneration():
    before = {**HEALTHY, "turn_end_rate": 0.0, "perplexity": 30.0}
    after = {**before, "chrf": 16.0, "perplexity": 20.0}
    result = verdict(before, after)
    assert result.label == "improved"
    assert "still: replies never end their turn" in result.summary


def test_replies_that_stop_looping_improve():
    before = {**HEALTHY, "repetition": 0.8, "distinct_2": 0.1}
    assert verdict(before, HEALTHY).label == "improved"


def test_empty_and_non_persian_replies_are_problems():
    assert set(problems({**HEALTHY, "mean_words": 2.0})) == {"empty"}
    assert set(problems({**HEALTHY, "persian_letters": 0.2})) == {"not_persian"}
    assert problems(HEALTHY) == {}
    assert verdict(HEALTHY, {**HEALTHY, "mean_words": 0.0, "bleu": 2.0}).label == "degenerate"


def test_the_demo_that_repeated_one_word_is_degenerate():
    """The tiny demo before this check: BLEU-4 rose from 0.00 to 0.10 on replies like "در در در …"."""
    references = [
        "سنگک نانی دراز و نسبتاً نازک از آرد سبوس‌دار است که روی سنگ‌ریزه‌های داغ تنور پخته می‌شود.",
        "لواش خیلی نازک و نرم است و زود خشک می‌شود؛ برای کباب و لقمه گرفتن عالی است.",
        "بهتر است چند دقیقه بیرون بماند تا نرم شود و بعد آن را گرم کنید.",
    ]
    before_replies = ["تهران شهر بزرگی", "کتاب‌ها و دانش‌آموزان ایران", "سلام، چطور می‌توانم کمک کنم؟ شما چه"]
    after_replies = [" ".join(["در"] * 30), " ".join(["برای"] * 30), " ".join(["به"] * 30)]

    def scores(replies):
        return {
            **corpus_scores(replies, references).as_dict(),
            **behaviour_scores(replies, references, [False] * 3).as_dict(),
        }

    before, after = scores(before_replies), scores(after_replies)
    result = verdict(before, after)
    assert result.label == "degenerate"
    assert "loop on a word" in result.summary and "lexical diversity collapses" in result.summary
