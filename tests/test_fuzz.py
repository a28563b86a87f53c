"""Property: for any conversation the dataset accepts, exactly the model turns are trained, nothing else."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_masking import _trained_spans  # pytest puts tests/ on sys.path

from persian_qlora import GemmaChatCollator, PersianChatDataset, PersianQLoRAError
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.testing import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
ALPHABET = "ابپتثجچحخدذرزژسشصضطظعغفقکگلمنوهیيكآۀ‌ ۰۱۲abcXYZ 019 .,،؛؟!«»()<>/_-\n\t\u200f\x00"
ROLES = ["system", "user", "assistant", "human", "gpt", "bot", "model", "User", "narrator"]

text = st.text(alphabet=ALPHABET, min_size=0, max_size=30)
# Anything goes: most of these are rejected or repaired by cleaning.
anything = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text}), max_size=8)
# Shaped like real chats (optional system prompt, alternating turns), so most are accepted.
chats = st.builds(
    lambda system, pairs: (
        [*([{"role": "system", "content": system}] if system else [])]
        + [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    ),
    st.one_of(st.none(), text),
    st.lists(st.tuples(text, text), min_size=1, max_size=4),
)
messages = st.one_of(anything, chats)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_only_model_turns_are_trained(conversation):
    try:
        dataset = PersianChatDataset([{"messages": conversation}], TOKENIZER, max_length=100_000)
    except PersianQLoRAError:
        return  # rejected with our own error (named record, reason): that is the other accepted outcome
    cleaned = dataset.conversations[0]
    item = dataset[0]
    expected = [m["content"] + "<end_of_turn>" for m in cleaned if m["role"] == "assistant"]
    assert [TOKENIZER.decode(span) for span in _trained_spans(item["labels"])] == expected
    # Every trained token is an input token at the same place, and the collator agrees from the ids alone.
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(item["labels"], item["input_ids"], strict=True))
    batch = GemmaChatCollator(TOKENIZER)([{"input_ids": item["input_ids"]}])
    assert batch["labels"][0].tolist() == item["labels"]
    # Nothing from a user or system turn is trained: their text never appears inside a trained span.
    roles = [m["role"] for m in cleaned]
    assert roles[0] in ("system", "user") and roles[-1] == "assistant"
