import pytest

from persian_qlora import NormalizerConfig, normalize_persian

ZWNJ = "\u200c"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("علي و كتاب", "علی و کتاب"),  # Arabic yeh and kaf
        ("مصطفى", "مصطفی"),  # alef maksura
        ("سلامـــــ", "سلام"),  # tatweel
        ("مُحَمَّد", "محمد"),  # diacritics
        ("ﻻ", "لا"),  # presentation-form ligature
        ("من مي خواهم", f"من می{ZWNJ}خواهم"),  # verbal prefix written apart
        ("نمی دانم", f"نمی{ZWNJ}دانم"),
        ("کتاب ها", f"کتاب{ZWNJ}ها"),  # plural suffix written apart
        ("بزرگ ترین شهر", f"بزرگ{ZWNJ}ترین شهر"),
        (f"کتاب{ZWNJ}{ZWNJ}ها", f"کتاب{ZWNJ}ها"),  # doubled ZWNJ
        (f"{ZWNJ}سلام {ZWNJ} دنیا{ZWNJ}", "سلام دنیا"),  # ZWNJ that joins nothing
        ("چطوری ؟", "چطوری؟"),  # no space before Persian punctuation
        ("« سلام »", "«سلام»"),
        ("یک  دو", "یک دو"),
        ("\ufeffسلام", "سلام"),  # BOM
    ],
)
def test_normalize_fixes_persian_orthography(raw, expected):
    assert normalize_persian(raw) == expected


def test_digits_are_kept_unless_asked():
    text = "سال ۱۴۰۲ و 2023 و ٤"
    assert normalize_persian(text) == text
    assert normalize_persian(text, NormalizerConfig(digits="latin")) == "سال 1402 و 2023 و 4"
    assert normalize_persian(text, NormalizerConfig(digits="fa")) == "سال ۱۴۰۲ و ۲۰۲۳ و ۴"


def test_number_separators_are_not_split():
    assert normalize_persian("۱۲۰٬۰۰۰ تومان") == "۱۲۰٬۰۰۰ تومان"


def test_code_indentation_survives():
    code = "def f():\n    return 1"
    assert normalize_persian(code) == code


@pytest.mark.parametrize("text", ["علي مي خواهد كتاب ها را « بخواند » .", f"{ZWNJ}a  b ؟", "ﻻ مُ"])
def test_normalize_is_idempotent(text):
    once = normalize_persian(text)
    assert normalize_persian(once) == once


@pytest.mark.parametrize(
    "text",
    [
        "git add . یعنی همه را اضافه کن",  # English-side spacing is not Persian's to fix
        "x = 1  # مقدار اولیه",  # aligned code comment
        "```python\nif x  :\n    y = 'ي'\n```",  # fenced code keeps everything, even Arabic yeh
        "رمزی مثل `123  456` ضعیف است",  # inline code
        "فاصلهٔ کامل، یعنی «می خواهم»، مناسب نیست.",  # a cited spelling keeps its space
        "معمولاً و دقیقاً",  # the fatha tanwin of adverbs is standard spelling
        "خانهٔ ما",  # hamza above
    ],
)
def test_text_that_must_not_change(text):
    assert normalize_persian(text) == text
