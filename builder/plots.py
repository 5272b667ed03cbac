"""The family report's pictures (PNG, headless matplotlib), from report.json data only."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on build machines
import matplotlib.pyplot as plt  # noqa: E402


def mean_accuracy(record: dict, headline) -> float | None:
    values = [headline(record["metrics"], task) for task in record["metrics"] if task != "perplexity"]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _models(report: dict) -> list[dict]:
    return [report["teacher"], *report["students"]]


def accuracy_vs(report: dict, headline, x_of, xlabel: str, out: Path) -> Path | None:
    points = [(x_of(m), mean_accuracy(m, headline), m["name"]) for m in _models(report)]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for x, y, name in points:
        axes.scatter(x, y, color="tab:red" if name == "teacher" else "tab:blue")
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("mean accuracy over tasks")
    axes.grid(alpha=0.3)
    return _save(figure, out)


def loss_curves(report: dict, out: Path) -> Path | None:
    figure, axes = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for student in report["students"]:
        curve = _read_curve(student["lineage"]["distillation"].get("loss_curve"))
        if curve:
            axes.plot([p[0] for p in curve], [p[1] for p in curve], label=student["name"])
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("distillation loss")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, out)


def _read_curve(path: str | None) -> list[tuple[float, float]]:
    if not path or not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(row.get("tokens", row.get("step", 0)), row["loss"]) for row in rows if "loss" in row]


def importance_profile(block_importance: list[float] | None, out: Path) -> Path | None:
    if not block_importance:
        return None
    figure, axes = plt.subplots(figsize=(5, 3.0))
    axes.bar(range(len(block_importance)), block_importance, color="tab:green")
    axes.set_xlabel("layer")
    axes.set_ylabel("block importance (1 - cos)")
    return _save(figure, out)


def _save(figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
