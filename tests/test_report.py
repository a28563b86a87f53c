"""The report on hand-made report data: the behaviour table, honest verdicts, and charts whose labels never collide."""

import json
from itertools import combinations

import matplotlib
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from persian_qlora.behaviour import behaviour_scores
from persian_qlora.metrics import corpus_scores
from persian_qlora.report import behaviour_table_lines, verdict_lines, write_report

matplotlib.use("Agg")

REFERENCES = [
    "سنگک نانی دراز و نسبتاً نازک از آرد سبوس‌دار است که روی سنگ‌ریزه‌های داغ تنور پخته می‌شود.",
    "لواش خیلی نازک و نرم است و زود خشک می‌شود؛ برای کباب و لقمه گرفتن عالی است.",
    "بهتر است چند دقیقه بیرون بماند تا نرم شود و بعد آن را گرم کنید.",
]
PROMPTS = [[{"role": "user", "content": f"پرسش {i}"}] for i in range(3)]
VARIED = ["فردا صبح زود بیدار شدیم", "کتاب‌ها روی میز ماندند", "سلام، چطور کمکتان کنم؟"]
LOOPING = [" ".join([word] * 30) for word in ("و", "برای", "است")]
LEARNED = [
    "سنگک نانی دراز و نازک است که روی سنگ‌ریزه‌های داغ پخته می‌شود.",
    "لواش نازک و نرم است و برای کباب عالی است.",
    "بهتر است چند دقیقه بیرون بماند تا نرم شود.",
]


def scores(replies, ended, perplexity=None):
    out = {
        **corpus_scores(replies, REFERENCES).as_dict(),
        **behaviour_scores(replies, REFERENCES, ended).as_dict(),
        "texts": replies,
        "ended_turn": ended,
    }
    return out if perplexity is None else {**out, "perplexity": perplexity}


def run(method, before, after, merged=()):
    log = [{"step": 1, "loss": 7.8, "grad_norm": 2.0}, {"step": 2, "loss": 6.9, "grad_norm": 1.5}]
    train = {"log": log, "train_seconds": 12.0, "trained_tokens_per_second": 900.0, "memory": {"cpu_peak_rss_gb": 1.2}}
    out = {"method": method, "train": train, "before": before, "after": after}
    out |= {"references": REFERENCES, "prompts": PROMPTS}
    return {**out, "merged": [{**m, "merge_base": base} for base, m in merged]} if merged else out


def report(*runs):
    config = {"model": "tiny", "train_data": "train.jsonl", "test_data": "test.jsonl", "lora": {}, "train": {}}
    return {"config": {**config, "max_new_tokens": 30, "generation": {}}, "runs": list(runs)}


def collapsed_and_learned():
    before = scores(VARIED, [False] * 3)
    qlora = run("qlora", before, scores(LOOPING, [False] * 3), [("original", scores(LOOPING, [False] * 3))])
    lora = run("lora", before, scores(LEARNED, [True] * 3))
    return report(qlora, lora)


def test_a_collapsed_run_is_degenerate_and_a_learning_run_improved():
    data = collapsed_and_learned()
    assert data["runs"][0]["after"]["bleu"] > data["runs"][0]["before"]["bleu"]  # looping earns some overlap
    lines = verdict_lines(data)
    assert lines[0].startswith("- **QLoRA (NF4 base): degenerate.** Replies loop on a word or short phrase")
    assert lines[1].startswith("- **QLoRA (NF4 base), merged bf16 (original base): degenerate** against the 16-bit")
    assert lines[3].startswith("- **LoRA (16-bit base): improved.**") and "turn-end rate 0% → 100%" in lines[3]
    assert "training loss 7.800 → 6.900" in lines[2]


def test_report_markdown_has_the_behaviour_table_and_the_verdicts(tmp_path):
    data = collapsed_and_learned()
    data["runs"][0]["prompt_normalization"] = None
    write_report(data, tmp_path)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Prompts sent as written (not normalised)." in text
    assert "## Behaviour" in text
    assert "| QLoRA (NF4 base), merged bf16 (original base) | 0% | 96% | 0.03 | 100% |" in text
    assert "| LoRA (16-bit base), after | 100% | 0% |" in text and "| *references* | – | 0% |" in text
    assert "QLoRA (NF4 base): improved" not in text and "QLoRA (NF4 base): degenerate" in text
    assert "[token limit]" in text  # the looping samples never ended their turn
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved["runs"][0]["after"]["repetition"] == pytest.approx(26 / 27)  # 27 four-grams, 1 distinct


def test_behaviour_table_has_one_row_per_evaluated_model_and_the_references():
    rows = behaviour_table_lines(collapsed_and_learned())[2:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| QLoRA (NF4 base), before",
        "| QLoRA (NF4 base), after",
        "| QLoRA (NF4 base), merged bf16 (original base)",
        "| LoRA (16-bit base), before",
        "| LoRA (16-bit base), after",
        "| *references*",
    ]


def _drawn_texts(fig: Figure) -> list[Text]:
    """Every text a chart shows: titles, axis labels, tick labels inside the view, annotations, legends."""
    texts = list(fig.texts)
    for ax in (ax for ax in fig.axes if ax.get_visible()):
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
        for axis, (low, high), index in ((ax.xaxis, ax.get_xlim(), 0), (ax.yaxis, ax.get_ylim(), 1)):
            texts.append(axis.get_offset_text())
            low, high = sorted((low, high))
            texts += [t for t in axis.get_ticklabels() if low <= t.get_position()[index] <= high]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _colliding_labels(fig: Figure) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(fig)]
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]


def test_no_chart_has_colliding_labels_whatever_the_number_of_runs_and_merges(tmp_path, monkeypatch):
    checked = {}
    save = Figure.savefig

    def checked_save(fig, path, *args, **kwargs):
        checked[str(path).rsplit("/", 1)[-1]] = _colliding_labels(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_save)
    before = scores(VARIED, [False] * 3, perplexity=90.0)
    after = scores(LEARNED, [True] * 3, perplexity=40.0)
    merges = [(base, after) for base in ("original", "nf4", "original-bf16", "nf4-double")]
    runs = run("qlora", before, after, merges), run("lora", before, after, merges[:2]), run("dora", before, after)
    data = report(*runs)
    write_report(data, tmp_path)
    assert set(checked) == {"loss.png", "grad_norm.png", "metrics.png", "resources.png"}
    assert checked == dict.fromkeys(checked, [])
    with_two_runs = collapsed_and_learned()
    checked.clear()
    write_report(with_two_runs, tmp_path)
    assert checked["metrics.png"] == [] and checked["resources.png"] == []


def test_a_merged_model_is_judged_against_the_base_it_was_merged_into():
    # The real 270M's figures (docs/results.md): the NF4 base scores 73.57, the 16-bit base 48.8.
    nf4_base = scores(VARIED, [True] * 3, perplexity=73.57)
    sixteen_bit_base = scores(VARIED, [True] * 3, perplexity=48.8)
    trained = scores(LEARNED, [True] * 3, perplexity=29.9)
    merged = [("original", scores(LEARNED, [True] * 3, perplexity=28.56)), ("nf4", trained)]
    data = report(run("qlora", nf4_base, trained, merged), run("lora", sixteen_bit_base, trained))
    original, nf4 = verdict_lines(data)[1:3]
    assert "merged bf16 (original base): improved** against the 16-bit base it was merged into" in original
    assert "perplexity 48.80 → 28.56" in original and "Against the NF4 base: BLEU-4" in original
    assert original.endswith("perplexity 73.57 → 28.56.")
    assert "merged bf16 (nf4 base): improved** against the NF4 base it was merged into" in nf4
    assert "perplexity 73.57 → 29.90" in nf4 and nf4.endswith("perplexity 48.80 → 29.90.")


def test_without_a_lora_run_the_merge_is_judged_against_the_16_bit_base_compare_evaluated():
    nf4_base = scores(VARIED, [True] * 3, perplexity=73.57)
    trained = scores(LEARNED, [True] * 3, perplexity=29.9)
    qlora = run("qlora", nf4_base, trained, [("original", scores(LEARNED, [True] * 3, perplexity=28.56))])
    qlora["base_16bit"] = scores(VARIED, [True] * 3, perplexity=48.8)
    merged_line = verdict_lines(report(qlora))[1]
    assert "against the 16-bit base it was merged into" in merged_line and "perplexity 48.80 → 28.56" in merged_line
