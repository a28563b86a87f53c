"""The comparison report: ``report.json`` (every figure), ``report.md`` (the table, signatures, samples) and charts."""

from __future__ import annotations

import html
import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import torch

from persian_qlora._files import atomic_write_text

__all__ = [
    "behaviour_table_lines",
    "environment",
    "merge_baselines",
    "merge_table_lines",
    "table_lines",
    "verdict_lines",
    "write_report",
]

_PACKAGES = ("persian-qlora", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "sacrebleu")
_LABELS = {"qlora": "QLoRA (NF4 base)", "lora": "LoRA (16-bit base)"}


def environment() -> dict[str, Any]:
    """Package versions, device and date, for the record."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "packages": versions,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _settings(generation: dict[str, Any] | None) -> str:
    return "".join(f", {k}={v}" for k, v in (generation or {}).items())


def _gb(phase: dict[str, Any]) -> float:
    memory = phase.get("memory", {})
    return memory.get("cuda_max_allocated_gb", memory.get("cpu_peak_rss_gb", 0.0))


def table_lines(report: dict[str, Any]) -> list[str]:
    """The report's main table (markdown), one row per run and per merged model."""
    head = (
        "| run | BLEU-4 before | BLEU-4 after | ROUGE-L before | ROUGE-L after | chrF before | chrF after "
        "| peak memory, train (GB) | train time (s) | trained tokens/s |"
    )
    lines = [head, "|" + "---|" * 10]
    for run in report["runs"]:
        before, after, train = run["before"], run["after"], run["train"]
        lines.append(
            f"| {_LABELS.get(run['method'], run['method'])} | {before['bleu']:.2f} | {after['bleu']:.2f} "
            f"| {before['rouge_l']:.2f} | {after['rouge_l']:.2f} | {before['chrf']:.2f} | {after['chrf']:.2f} "
            f"| {_gb(train):.2f} | {train['train_seconds']:.1f} | {train['trained_tokens_per_second']:.0f} |"
        )
        for merged in run.get("merged", []):
            lines.append(
                f"| {_LABELS.get(run['method'], run['method'])}, merged bf16 ({merged['merge_base']} base) | "
                f"| {merged['bleu']:.2f} | | {merged['rouge_l']:.2f} | | {merged['chrf']:.2f} | | | |"
            )
    return lines


def merge_table_lines(report: dict[str, Any]) -> list[str]:
    """The merge-base table (markdown): each merged run's adapter as trained against its merged bf16 models.

    Empty when nothing was merged. Perplexity is over the model-turn tokens of the test conversations.
    """
    lines = []
    for run in report["runs"]:
        label = _LABELS.get(run["method"], run["method"])
        rows = [(f"{label} + adapter, as trained", run["after"])]
        rows += [(f"merged bf16, {m['merge_base']} base", m) for m in run.get("merged", [])]
        if len(rows) > 1:
            lines += [
                f"| {row} | {s['bleu']:.2f} | {s['rouge_l']:.2f} | {s['chrf']:.2f} | "
                + (f"{s['perplexity']:.3f} |" if "perplexity" in s else "– |")
                for row, s in rows
            ]
    return ["| model | BLEU-4 | ROUGE-L | chrF | perplexity |", "|---|---|---|---|---|", *lines] if lines else []


def _evaluations(run: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every evaluated model of a run, in order: (stage, short label, scores) for before, after and each merge."""
    stages = [("before", "before", run["before"]), ("after", "after", run["after"])]
    return stages + [("merged", f"merged bf16 ({m['merge_base']} base)", m) for m in run.get("merged", [])]


def merge_baselines(report: dict[str, Any], run: dict[str, Any], merged: dict[str, Any]) -> list[tuple[str, dict]]:
    """The bases the report can hold a merged model against, the one it was merged into first: the 16-bit base
    (LoRA's "before", or the one compare evaluated when LoRA did not run) for an original-base merge, the NF4 base
    (QLoRA's "before") for an nf4 merge. Judging an original-base merge against the NF4 base would credit the merge
    with removing NF4's error."""
    lora = next((r["before"] for r in report["runs"] if r["method"] == "lora"), None)
    bases = {"16-bit base": lora or run.get("base_16bit"), "NF4 base": None}
    if run["method"] == "qlora":
        bases["NF4 base"] = run["before"]
    order = ("NF4 base", "16-bit base") if merged["merge_base"] == "nf4" else ("16-bit base", "NF4 base")
    return [(name, bases[name]) for name in order if bases[name] is not None]


def _headline(before: dict[str, Any], after: dict[str, Any]) -> str:
    """BLEU-4 and, when measured, perplexity from one evaluation to another."""
    moves = [f"BLEU-4 {before['bleu']:.2f} → {after['bleu']:.2f}"]
    if before.get("perplexity") is not None and after.get("perplexity") is not None:
        moves.append(f"perplexity {before['perplexity']:.2f} → {after['perplexity']:.2f}")
    return ", ".join(moves)


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """One verdict per run against its base as loaded and per merged model against the base it was merged into
    (:func:`merge_baselines`; the delta against the other base too, where the report has both), see
    ``behaviour.verdict``; and the training loss."""
    from persian_qlora.behaviour import verdict

    reference_repetition = _reference_behaviour(report)["repetition"] if report["runs"] else None
    lines = []
    for run in report["runs"]:
        label = _LABELS.get(run["method"], run["method"])
        for stage, name, scores in _evaluations(run)[1:]:
            if stage == "after":
                judged = verdict(run["before"], scores, reference_repetition=reference_repetition)
                lines.append(f"- **{label}: {judged.label}.** {judged.summary[0].upper()}{judged.summary[1:]}.")
                continue
            (base_name, base), *others = merge_baselines(report, run, scores)
            judged = verdict(base, scores, reference_repetition=reference_repetition)
            also = "".join(f" Against the {other}: {_headline(scores_, scores)}." for other, scores_ in others)
            lines.append(
                f"- **{label}, {name}: {judged.label}** against the {base_name} it was merged into. "
                f"{judged.summary[0].upper()}{judged.summary[1:]}.{also}"
            )
        figures = []
        log = run["train"].get("log", [])
        if len(log) >= 2:
            figures.append(f"training loss {log[0]['loss']:.3f} → {log[-1]['loss']:.3f}")
        if run["after"].get("perplexity") is not None:
            figures.append(
                f"test perplexity (model turns) {run['before']['perplexity']:.2f} → {run['after']['perplexity']:.2f}"
            )
        if figures:
            lines.append(f"- {label}: {'; '.join(figures)}.")
    return lines


def _reference_behaviour(report: dict[str, Any]) -> dict[str, Any]:
    from persian_qlora.behaviour import behaviour_scores
    from persian_qlora.normalize import DEFAULT_NORMALIZER

    references = report["runs"][0]["references"]
    normalize = DEFAULT_NORMALIZER if report["runs"][0]["before"].get("normalized", True) else None
    return behaviour_scores(references, references, normalize=normalize).as_dict()


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _behaviour_row(name: str, scores: dict[str, Any]) -> str:
    distinct = "–" if scores.get("distinct_2") is None else f"{scores['distinct_2']:.2f}"
    return (
        f"| {name} | {_share(scores.get('turn_end_rate'))} | {_share(scores.get('repetition'))} | {distinct} "
        f"| {_share(scores.get('persian_letters'))} | {scores.get('mean_words', 0):.1f} |"
    )


def behaviour_table_lines(report: dict[str, Any]) -> list[str]:
    """The behaviour table (markdown): one row per evaluated model, and the references as a yardstick."""
    if not report["runs"]:
        return []
    rows = [
        _behaviour_row(f"{_LABELS.get(run['method'], run['method'])}, {name}", scores)
        for run in report["runs"]
        for _, name, scores in _evaluations(run)
    ]
    return [
        "| model | turn-end rate | repetition (4-grams) | distinct-2 | Persian letters | words per reply |",
        "|---|---|---|---|---|---|",
        *rows,
        _behaviour_row("*references*", _reference_behaviour(report)),
    ]


def _sample_text(scores: dict[str, Any], i: int) -> str:
    ended = scores.get("ended_turn")
    return scores["texts"][i] + (" [token limit]" if ended is not None and not ended[i] else "")


def _samples(report: dict[str, Any], count: int) -> list[str]:
    runs = report["runs"]
    if not runs or count <= 0:
        return []
    columns = ["prompt (last user turn)", "reference"]
    for run in runs:
        label = _LABELS.get(run["method"], run["method"])
        columns += [f"{label}: before", f"{label}: after"]
    out = ['<div dir="rtl">', "", "<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for i in range(min(count, len(runs[0]["references"]))):
        cells = [runs[0]["prompts"][i][-1]["content"], runs[0]["references"][i]]
        for run in runs:
            cells += [_sample_text(run["before"], i), _sample_text(run["after"], i)]
        cells_html = (html.escape(c).replace("\n", "<br>") for c in cells)
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells_html) + "</tr>")
    note = "[token limit]: the reply reached the token limit without ending its turn."
    return [*out, "</table>", "", "</div>", "", note]


# The metric chart's panels: (key, title, scale, axis limit). Shares are shown in per cent on a 0-100 axis.
_METRIC_PANELS = (
    ("bleu", "BLEU-4 (higher is better)", 1, None),
    ("rouge_l", "ROUGE-L (higher is better)", 1, None),
    ("chrf", "chrF (higher is better)", 1, None),
    ("perplexity", "perplexity, model turns (lower is better)", 1, None),
    ("turn_end_rate", "turn-end rate, % (higher is better)", 100, 100),
    ("repetition", "repeated 4-grams, % (lower is better)", 100, 100),
    ("distinct_2", "distinct-2 (higher is better)", 1, 1),
    ("persian_letters", "Persian letters, %", 100, 100),
    ("mean_words", "words per reply", 1, None),
)
_STAGE_COLORS = {"before": "#9e9e9e", "after": "#2a7ab9", "merged": "#e08a1e"}
_RUN_COLORS = ("#2a7ab9", "#e08a1e", "#5aa02c", "#8c564b")


class _Panel(NamedTuple):
    title: str
    values: list[float | None]  # one per bar; None: not measured
    reference: float | None = None  # drawn as a dashed line
    limit: float | None = None  # the axis' natural end (100 for a share in per cent)


def _bar_panels(rows: list[tuple[str, str]], panels: list[_Panel], path: Path, *, columns: int = 3) -> None:
    """Horizontal bar panels sharing one label per bar (``rows``: label, colour), written to ``path``.

    Bars run sideways so that each label has a line of its own: labels cannot collide however many runs and
    merges there are, and the figure grows with the rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid_rows = -(-len(panels) // columns)
    height = 1.0 + 0.28 * len(rows)  # per panel row: room for a two-line title and one label line per bar
    fig, axes = plt.subplots(
        grid_rows, columns, figsize=(4.2 * columns + 1.8, height * grid_rows), dpi=100, sharey=True, squeeze=False
    )
    positions = list(range(len(rows)))
    for ax, panel in zip(axes.flat, panels, strict=False):
        shown = [v if v is not None else 0.0 for v in panel.values]
        bars = ax.barh(positions, shown, color=[color for _, color in rows], height=0.7)
        for bar, value in zip(bars, panel.values, strict=True):
            text = "–" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
            ax.annotate(
                text,
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
        title = panel.title
        if panel.reference is not None:  # named in the title: a legend could cover a value label
            ax.axvline(panel.reference, color="#444444", linestyle="--", linewidth=1)
            title += "\ndashed: the references"
        ax.set_title(title, fontsize=9)
        end = panel.limit or max([*shown, panel.reference or 0.0]) or 1.0
        ax.set_xlim(0, end * 1.2)  # from zero, with room for the value labels
        ax.tick_params(axis="x", labelsize=7)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    axes[0, 0].set_yticks(positions, [label for label, _ in rows])
    axes[0, 0].invert_yaxis()  # first row on top
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _charts(report: dict[str, Any], output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = []
    for key, title in (("loss", "training loss"), ("grad_norm", "gradient norm")):
        fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
        for run in runs:
            points = [(e["step"], e[key]) for e in run["train"].get("log", []) if key in e]
            if points:
                ax.plot(*zip(*points, strict=True), label=_LABELS.get(run["method"], run["method"]))
        ax.set(xlabel="optimizer step", ylabel=key, title=f"{title}: QLoRA vs LoRA")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output_dir / f"{key}.png")
        plt.close(fig)
        names.append(f"{key}.png")
    if not runs:
        return names

    evaluations = [
        (f"{_LABELS.get(run['method'], run['method'])}, {name}", stage, scores)
        for run in runs
        for stage, name, scores in _evaluations(run)
    ]
    references = _reference_behaviour(report)
    panels = []
    for key, title, scale, limit in _METRIC_PANELS:
        values = [scores.get(key) for _, _, scores in evaluations]
        if all(v is None for v in values):
            continue  # e.g. perplexity when it was not asked for
        reference = references.get(key)
        scaled = [None if v is None else v * scale for v in values]
        panels.append(_Panel(title, scaled, None if reference is None else reference * scale, limit))
    rows = [(label, _STAGE_COLORS[stage]) for label, stage, _ in evaluations]
    _bar_panels(rows, panels, output_dir / "metrics.png")

    run_rows = [
        (_LABELS.get(run["method"], run["method"]), _RUN_COLORS[i % len(_RUN_COLORS)]) for i, run in enumerate(runs)
    ]
    resources = [
        _Panel("peak memory in training (GB)", [_gb(run["train"]) for run in runs]),
        _Panel("training time (s)", [run["train"]["train_seconds"] for run in runs]),
        _Panel("trained tokens/s", [run["train"]["trained_tokens_per_second"] or 0 for run in runs]),
    ]
    _bar_panels(run_rows, resources, output_dir / "resources.png")
    return [*names, "metrics.png", "resources.png"]


_MERGE_NOTE = (
    "The adapter as trained runs on the base it was trained on (4-bit for QLoRA); each merged model is "
    "W0 + (B A)·alpha/r saved in bf16, with W0 the original 16-bit weights or their NF4 round trip. "
    "Perplexity: over every model-turn token of the evaluated test conversations."
)
_BEHAVIOUR_NOTE = (
    "Turn-end rate: replies that ended with the turn end (`<end_of_turn>`, Gemma 4's `<turn|>`) or `<eos>` before "
    "the token limit. Repetition: the "
    "share of a reply's word 4-grams that repeat an earlier one, averaged over replies. Distinct-2: distinct "
    "word bigrams over all bigrams of all replies. Persian letters: among all letters of all replies. Words as "
    "ROUGE-L counts them, after normalisation. The references row is the yardstick."
)


def _prompt_note(runs: list[dict[str, Any]]) -> str:
    """Whether the evaluation prompts were Persian-normalised before generation, as the training text was."""
    if not runs or "prompt_normalization" not in runs[0]:
        return "Whether the prompts were normalised was not recorded."
    settings = runs[0]["prompt_normalization"]
    if settings is None:
        return "Prompts sent as written (not normalised)."
    on = ", ".join(name for name, value in settings.items() if value)
    return f"Prompts (user and system text) normalised as the training text ({on})."


def _section(title: str, table: list[str], note: str) -> list[str]:
    return [f"## {title}", "", *table, "", note, ""] if table else []


def write_report(report: dict[str, Any], output_dir: str | Path, *, samples: int = 3) -> Path:
    """Add the environment to ``report`` and write ``report.json``, ``report.md`` and the PNG charts."""
    from persian_qlora.behaviour import STILL_LOOPING_MARGIN

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report.setdefault("environment", environment())
    charts = _charts(report, output_dir)
    runs, env = report["runs"], report["environment"]
    first = runs[0]["after"] if runs else {}
    memory_note = "CUDA max allocated" if torch.cuda.is_available() else "CPU peak resident memory, sampled every 10 ms"
    config = report["config"]
    lines = [
        "# QLoRA vs LoRA on Persian conversations",
        "",
        f"Model: {config['model']}. Training data: `{config['train_data']}`; evaluation: `{config['test_data']}` "
        f"({first.get('n', 0)} conversations, the last model turn of each, greedy, at most "
        f"{config['max_new_tokens']} new tokens{_settings(config.get('generation'))}). "
        f"{_prompt_note(runs)} Scores computed after normalisation: {'on' if first.get('normalized') else 'off'}.",
        "",
        *table_lines(report),
        "",
        f"Scores are 0-100. Memory: {memory_note}, over the training phase of each run (each run in its own "
        'process). "Before" is each run\'s own base as loaded (4-bit for QLoRA, 16-bit for LoRA).',
        "",
        *_section("Behaviour", behaviour_table_lines(report), _BEHAVIOUR_NOTE),
        *_section("Merge bases", merge_table_lines(report), _MERGE_NOTE),
        "## What changed",
        "",
        *verdict_lines(report),
        "",
        "Each verdict weighs the behaviour above with BLEU-4, ROUGE-L, chrF and perplexity against the run's base "
        "as loaded, and a merged model's against the base it was merged into (the 16-bit base for the original "
        "base, the NF4 base for nf4) (`persian_qlora.behaviour.verdict`): replies that newly loop, lose their "
        "diversity, stop ending their turn, leave Persian or go empty are *degenerate* whatever the overlap scores "
        "do; otherwise each metric that moved beyond a noise step counts as a gain or a loss, and gains with "
        "replies that still repeat more than the references by "
        f"{STILL_LOOPING_MARGIN:.0%} of their 4-grams are *learned, but still loops*, never *improved*.",
        "",
        "## Settings and signatures",
        "",
        f"- BLEU: sacrebleu `{first.get('bleu_signature', '')}`",
        f"- chrF: sacrebleu `{first.get('chrf_signature', '')}`",
        "- ROUGE-L: rouge-score, F1, with persian_qlora's Persian word tokenizer",
        f"- LoRA: {json.dumps(config['lora'], ensure_ascii=False)}",
        f"- training: {json.dumps(config['train'], ensure_ascii=False)}",
        f"- device: {env['device']} ({env['cpu_threads']} torch threads); date: {env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
        "",
        "## Charts",
        "",
        *[f"![{name}]({name})" for name in charts],
        "",
        "## Samples",
        "",
        *_samples(report, samples),
        "",
    ]
    atomic_write_text(output_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=2))
    atomic_write_text(output_dir / "report.md", "\n".join(lines))
    return output_dir / "report.md"
