"""The comparison report: ``report.json`` (every figure), ``report.md`` (the table, signatures, samples) and charts."""

from __future__ import annotations

import html
import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from persian_qlora._files import atomic_write_text

__all__ = ["environment", "merge_table_lines", "table_lines", "write_report"]

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


def _verdicts(report: dict[str, Any]) -> list[str]:
    lines = []
    for run in report["runs"]:
        label = _LABELS.get(run["method"], run["method"])
        for metric, name in (("bleu", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF")):
            before, after = run["before"][metric], run["after"][metric]
            word = "improved" if after > before else "did not improve" if after == before else "got worse"
            lines.append(f"- {label}: {name} {word}, {before:.2f} → {after:.2f}.")
        if "perplexity" in run["after"]:
            before, after = run["before"]["perplexity"], run["after"]["perplexity"]
            lines.append(f"- {label}: test perplexity (model turns) {before:.2f} → {after:.2f}.")
        log = run["train"].get("log", [])
        if len(log) >= 2:
            lines.append(f"- {label}: training loss {log[0]['loss']:.3f} → {log[-1]['loss']:.3f}.")
    return lines


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
            cells += [run["before"]["texts"][i], run["after"]["texts"][i]]
        cells_html = (html.escape(c).replace("\n", "<br>") for c in cells)
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells_html) + "</tr>")
    return [*out, "</table>", "", "</div>"]


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

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=100)
    for ax, (metric, title) in zip(axes, (("bleu", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF")), strict=True):
        labels, values, colors = [], [], []
        for run in runs:
            stages = [("before", run["before"], "#999999"), ("after", run["after"], "#2a7ab9")]
            stages += [(f"merged {m['merge_base']}", m, "#e08a1e") for m in run.get("merged", [])]
            for stage, scores, color in stages:
                labels.append(f"{run['method']}\n{stage}")
                values.append(scores[metric])
                colors.append(color)
        ax.bar(labels, values, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "metrics.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=100)
    labels = [run["method"] for run in runs]
    figures = (
        ("peak memory in training (GB)", [_gb(run["train"]) for run in runs]),
        ("training time (s)", [run["train"]["train_seconds"] for run in runs]),
        ("trained tokens/s", [run["train"]["trained_tokens_per_second"] or 0 for run in runs]),
    )
    for ax, (title, values) in zip(axes, figures, strict=True):
        ax.bar(labels, values, color=["#2a7ab9", "#e08a1e", "#5aa02c"][: len(values)])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(output_dir / "resources.png")
    plt.close(fig)
    return [*names, "metrics.png", "resources.png"]


def _merge_section(report: dict[str, Any]) -> list[str]:
    table = merge_table_lines(report)
    if not table:
        return []
    return [
        "## Merge bases",
        "",
        *table,
        "",
        "The adapter as trained runs on the base it was trained on (4-bit for QLoRA); each merged model is "
        "W0 + (B A)·alpha/r saved in bf16, with W0 the original 16-bit weights or their NF4 round trip. "
        "Perplexity: over every model-turn token of the evaluated test conversations.",
        "",
    ]


def write_report(report: dict[str, Any], output_dir: str | Path, *, samples: int = 3) -> Path:
    """Add the environment to ``report`` and write ``report.json``, ``report.md`` and the PNG charts."""
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
        f"Normalisation {'on' if first.get('normalized') else 'off'}.",
        "",
        *table_lines(report),
        "",
        f"Scores are 0-100. Memory: {memory_note}, over the training phase of each run (each run in its own "
        'process). "Before" is each run\'s own base as loaded (4-bit for QLoRA, 16-bit for LoRA).',
        "",
        *_merge_section(report),
        "## What changed",
        "",
        *_verdicts(report),
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
