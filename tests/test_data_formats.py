"""The data formats people have: ChatML messages, ShareGPT, TRL prompt-completion, Alpaca, and a column mapping.

Each reads to the same Gemma turns and labels as its `messages` record, and trains; detection is reported, and a
source that mixes formats is refused naming the record."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from persian_qlora import ConfigError, InvalidRecordError, PersianChatDataset
from persian_qlora.cli import main
from persian_qlora.modeling import build_lora_model
from persian_qlora.training import TrainConfig, make_trainer

SYSTEM = "پاسخ را کوتاه بنویس."
QUESTION, CONTEXT, ANSWER = (
    "این جمله را خلاصه کن:",
    "کوروش بزرگ بنیان‌گذار شاهنشاهی هخامنشی بود.",
    "کوروش هخامنشیان را بنیان نهاد.",
)


def _messages(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# (format, record, the equivalent messages record, columns)
CASES = [
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "human", "value": QUESTION},
                {"from": "gpt", "value": ANSWER},
            ]
        },
        _messages(("system", SYSTEM), ("user", QUESTION), ("assistant", ANSWER)),
        None,
    ),
    (
        "prompt_completion",
        {"prompt": QUESTION, "completion": ANSWER},
        _messages(("user", QUESTION), ("assistant", ANSWER)),
        None,
    ),
    (
        "prompt_completion",  # TRL's conversational form, several turns in the prompt
        {
            "prompt": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "سلام"},
                {"role": "assistant", "content": "درود!"},
                {"role": "user", "content": QUESTION},
            ],
            "completion": [{"role": "assistant", "content": ANSWER}],
        },
        _messages(
            ("system", SYSTEM), ("user", "سلام"), ("assistant", "درود!"), ("user", QUESTION), ("assistant", ANSWER)
        ),
        None,
    ),
    (
        "alpaca",
        {"system": SYSTEM, "instruction": QUESTION, "input": CONTEXT, "output": ANSWER},
        _messages(("system", SYSTEM), ("user", f"{QUESTION}\n{CONTEXT}"), ("assistant", ANSWER)),
        None,
    ),
    (
        "alpaca",  # no input, an empty system: the instruction alone is the user turn
        {"system": "", "instruction": QUESTION, "input": "", "output": ANSWER},
        _messages(("user", QUESTION), ("assistant", ANSWER)),
        None,
    ),
    (
        "alpaca",  # LLaMA-Factory's history: earlier [instruction, output] pairs
        {"instruction": QUESTION, "output": ANSWER, "history": [["سلام", "درود!"], ["حالت چطوره؟", "خوبم."]]},
        _messages(
            ("user", "سلام"),
            ("assistant", "درود!"),
            ("user", "حالت چطوره؟"),
            ("assistant", "خوبم."),
            ("user", QUESTION),
            ("assistant", ANSWER),
        ),
        None,
    ),
    (
        "alpaca",  # a dataset's own field names, mapped with columns=
        {"soal": QUESTION, "matn": CONTEXT, "javab": ANSWER},
        _messages(("user", f"{QUESTION}\n{CONTEXT}"), ("assistant", ANSWER)),
        {"instruction": "soal", "input": "matn", "output": "javab"},
    ),
    (
        "messages",  # columns= also renames the messages list
        {"dialog": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]},
        _messages(("user", QUESTION), ("assistant", ANSWER)),
        {"messages": "dialog"},
    ),
]
IDS = ["sharegpt", "prompt-completion", "prompt-completion-conversational", "alpaca", "alpaca-no-input"]
IDS += ["alpaca-history", "alpaca-columns", "messages-columns"]


@pytest.mark.parametrize(("data_format", "record", "equivalent", "columns"), CASES, ids=IDS)
def test_every_format_reads_as_its_messages_record(tiny_tokenizer, data_format, record, equivalent, columns):
    expected = PersianChatDataset([equivalent], tiny_tokenizer)
    for given in (None, data_format):  # detected, then forced
        dataset = PersianChatDataset([record], tiny_tokenizer, columns=columns, data_format=given)
        assert dataset.conversations == expected.conversations
        assert dataset.input_ids == expected.input_ids and dataset.labels == expected.labels
        assert dataset.stats.data_format == data_format
        assert dataset.stats.data_format_detected is (given is None)
        assert dataset.stats.as_dict()["data_format"] == data_format
        assert f"data format             {data_format} ({'detected' if given is None else 'given'})" in str(
            dataset.stats
        )


def test_detection_prefers_messages_over_other_columns(tiny_tokenizer):
    # HuggingFaceH4/ultrachat_200k carries a "prompt" column beside its "messages"; None-valued fields are absent.
    record = {**_messages(("user", QUESTION), ("assistant", ANSWER)), "prompt": QUESTION, "completion": ANSWER}
    record["instruction"] = None
    assert PersianChatDataset([record], tiny_tokenizer).stats.data_format == "messages"


def test_a_forced_format_needs_its_fields_and_bad_settings_name_the_nearest(tiny_tokenizer):
    record = _messages(("user", QUESTION), ("assistant", ANSWER))
    with pytest.raises(
        InvalidRecordError, match=r"record 0: lacks 'instruction' and 'output', which data_format='alpaca' needs"
    ):
        PersianChatDataset([record], tiny_tokenizer, data_format="alpaca")
    with pytest.raises(ConfigError, match="did you mean 'sharegpt'"):
        PersianChatDataset([record], tiny_tokenizer, data_format="sharegp")
    with pytest.raises(ConfigError, match="'complete' is not a record field.*did you mean 'completion'"):
        PersianChatDataset([record], tiny_tokenizer, columns={"complete": "answer"})


def test_mixed_formats_are_refused_naming_the_record_or_skipped(tiny_tokenizer):
    records = [{"prompt": "سلام", "completion": "درود!"}, {"instruction": QUESTION, "output": ANSWER}]
    records.append({"prompt": QUESTION, "completion": ANSWER})
    with pytest.raises(InvalidRecordError) as caught:
        PersianChatDataset(records, tiny_tokenizer)
    assert caught.value.reason == "mixed formats"
    assert str(caught.value).startswith("record 1: is in the alpaca format, but record 0 is in the prompt_completion")
    skipped = PersianChatDataset(records, tiny_tokenizer, on_error="skip")
    assert len(skipped) == 2 and skipped.stats.skipped_invalid == {"mixed formats": 1}


@pytest.mark.parametrize(
    ("record", "reason", "text"),
    [
        ({"prompt": QUESTION}, "unknown format", "has 'prompt' but not 'completion'"),
        ({"instrction": QUESTION, "output": ANSWER}, "unknown format", "did you mean 'instruction' for 'instrction'?"),
        ({"prompt": QUESTION, "completion": None}, "unknown format", "but not 'completion'"),
        ({"prompt": [{"role": "user", "content": QUESTION}], "completion": ANSWER}, "prompt and completion differ", ""),
        ({"prompt": QUESTION, "completion": 7}, "content not text", "record 1, field 'completion': content is int"),
        ({"instruction": ["x"], "output": ANSWER}, "unsupported content part", "record 1, field 'instruction'"),
        ({"instruction": "<start_of_turn>", "output": ANSWER}, "control token in content", "field 'instruction'"),
        ({"instruction": QUESTION, "output": "   "}, "no model turn", ""),
        (
            {"instruction": QUESTION, "output": ANSWER, "history": ["سلام"]},
            "history not pairs",
            "field 'history': must",
        ),
        (
            {"instruction": QUESTION, "output": ANSWER, "history": [["سلام", 5]]},
            "content not text",
            "'history', message 1",
        ),
    ],
    ids=["prompt-alone", "misspelt-field", "completion-null", "shapes-differ", "completion-number", "instruction-list"]
    + ["control-token", "empty-output", "history-not-pairs", "history-answer-number"],
)
def test_bad_records_in_each_format_name_the_record_and_field(tiny_tokenizer, record, reason, text):
    good = (
        {"prompt": "سلام", "completion": "درود!"} if "prompt" in record else {"instruction": "سلام", "output": "درود!"}
    )
    if reason == "no model turn":  # not an error: dropped and counted, like a messages record without a reply
        dataset = PersianChatDataset([good, record], tiny_tokenizer)
        assert len(dataset) == 1 and dataset.stats.dropped == {"no model turn": 1}
        return
    source = [record] if reason == "unknown format" else [good, record]
    with pytest.raises(InvalidRecordError) as caught:
        PersianChatDataset(source, tiny_tokenizer)
    assert caught.value.reason == reason
    assert text in str(caught.value)


def test_each_format_trains_a_step_on_the_tiny_model(tiny_gemma3_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    model = build_lora_model(tiny_gemma3_path)
    config = TrainConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        warmup_steps=0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=1,
        extra={"disable_tqdm": True, "save_strategy": "no"},
    )
    by_format: dict[str, list] = {}
    for data_format, record, _, columns in CASES:
        if columns is None:
            by_format.setdefault(data_format, []).append(record)
    for data_format, records in by_format.items():
        dataset = PersianChatDataset(records, tokenizer)
        assert dataset.stats.data_format == data_format
        assert all(any(label != -100 for label in labels) for labels in dataset.labels)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer = make_trainer(model, tokenizer, dataset, config=config)
        trainer.train()
        loss = trainer.state.log_history[0]["loss"]
        assert torch.isfinite(torch.tensor(loss)) and trainer.run_metrics.trained_tokens > 0, data_format
        changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert changed, f"{data_format}: one step changed no trainable weight"


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_prepare_reads_data_format_and_columns_from_the_command_line(tmp_path, capsys):
    data = _jsonl(tmp_path / "qa.jsonl", [{"soal": QUESTION, "javab": ANSWER}, {"soal": "سلام", "javab": "درود!"}])
    columns = "{prompt: soal, completion: javab}"
    assert main(["prepare", "--data", str(data), "--columns", columns, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["data_format"], stats["data_format_detected"], stats["kept"]) == ("prompt_completion", True, 2)
    assert main(["prepare", "--data", str(data), "--columns", columns, "--data-format", "alpaca"]) == 2
    assert "qa.jsonl line 1: lacks 'instruction' and 'output', which data_format='alpaca'" in capsys.readouterr().err
    assert main(["prepare", "--data", str(data), "--columns", columns, "--data-format", "prompt_completion"]) == 0
    assert "data format             prompt_completion (given)" in capsys.readouterr().out
