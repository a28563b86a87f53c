"""The QLoRA-vs-LoRA comparison end to end on a tiny model: every report file, with every field."""

import json

import pytest

from persian_qlora.compare import CompareConfig, compare
from persian_qlora.dataset import bundled_corpus_path
from persian_qlora.training import RunConfig


@pytest.fixture(scope="module")
def report_dir(tiny_gemma3_path, tmp_path_factory):
    output = tmp_path_factory.mktemp("compare")
    run = RunConfig.load(
        None,
        {
            "model": str(tiny_gemma3_path),
            "data": str(bundled_corpus_path("train")),
            "max_steps": 2,
            "max_length": 256,
            "save_strategy": "no",
            "disable_tqdm": True,
        },
    )
    config = CompareConfig(
        run=run,
        output_dir=str(output),
        test_data=str(bundled_corpus_path("test")),
        max_eval=4,
        max_new_tokens=8,
        merge_bases=("original", "nf4"),
        perplexity=True,
        generation={"repetition_penalty": 1.3},
    )
    compare(config)
    return output


def test_report_files_exist_with_every_field(report_dir):
    for name in ("report.md", "report.json", "loss.png", "grad_norm.png", "metrics.png", "resources.png"):
        assert (report_dir / name).stat().st_size > 0, name
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert [run["method"] for run in report["runs"]] == ["qlora", "lora"]
    for run in report["runs"]:
        for stage in ("before", "after"):
            scores = run[stage]
            assert {"bleu", "rouge_l", "chrf", "bleu_signature", "tokens_per_second", "memory", "texts"} <= set(scores)
            assert scores["n"] == 4 and len(scores["texts"]) == 4 and "tok:intl" in scores["bleu_signature"]
            behaviour = ("turn_end_rate", "repetition", "distinct_2", "persian_letters", "mean_words")
            assert set(behaviour) | {"reference_words", "ended_turn"} <= set(scores)
            assert scores["turn_end_rate"] == sum(scores["ended_turn"]) / 4 and scores["reference_words"] > 10
        assert run["train"]["global_step"] == 2 and run["train"]["trained_tokens"] > 0, run["method"]
        assert run["train"]["memory"]["cpu_peak_rss_gb"] > 0 and run["load"]["seconds"] > 0, run["method"]
    for merged in report["runs"][0]["merged"]:
        assert {"turn_end_rate", "repetition", "distinct_2", "persian_letters", "mean_words"} <= set(merged)
    assert [m["merge_base"] for m in report["runs"][0]["merged"]] == ["original", "nf4"]
    assert "merged" not in report["runs"][1]
    assert report["environment"]["packages"]["transformers"]
    assert report["config"]["generation"] == {"repetition_penalty": 1.3}


def test_both_runs_share_data_order_and_settings(report_dir):
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    qlora, lora = report["runs"]
    assert qlora["references"] == lora["references"] and qlora["prompts"] == lora["prompts"]
    assert qlora["train"]["trained_tokens"] == lora["train"]["trained_tokens"]  # same batches, same order


def test_report_markdown_has_the_table_signature_and_rtl_samples(report_dir):
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "| QLoRA (NF4 base) |" in text and "| LoRA (16-bit base) |" in text and "merged bf16" in text
    assert "tok:intl" in text and "transformers 5." in text
    assert '<div dir="rtl">' in text and "![loss.png](loss.png)" in text
    assert "## Behaviour" in text and "| QLoRA (NF4 base), merged bf16 (nf4 base) |" in text
    assert "| *references* |" in text
    assert "Prompts (user and system text) normalised as the training text (characters, diacritics, spacing)." in text
    assert "- **QLoRA (NF4 base):" in text and "- **LoRA (16-bit base), " not in text  # LoRA was not merged


def test_the_nf4_merge_reproduces_the_trained_qlora_model_and_the_original_merge_does_not(report_dir):
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    qlora = report["runs"][0]
    for scores in (qlora["before"], qlora["after"], *qlora["merged"]):
        assert 1 < scores["perplexity"] < 1e6
    trained = qlora["after"]["perplexity"]
    merged = {m["merge_base"]: m["perplexity"] for m in qlora["merged"]}
    # nf4: the trained model up to bf16 rounding; original: off by the NF4 error of every quantised weight. The tiny
    # random model's perplexity is near its vocabulary size, which both errors barely move: the margin is small.
    assert abs(merged["nf4"] - trained) < 1e-3 * trained
    assert abs(merged["original"] - trained) > abs(merged["nf4"] - trained)
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "## Merge bases" in text and "| merged bf16, nf4 base |" in text and "test perplexity" in text
