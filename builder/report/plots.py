"""The family report's pictures (PNG, headless matplotlib), from the typed report only.

Every point carries its uncertainty as an error bar: mean accuracy ± its standard error
(the tasks' standard errors combined), throughput ± its standard deviation over passes.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

from builder.report.records import FamilyReport, ModelRecord, Score, VariantRecord
from builder.store.stage_store import write_bytes_atomic

matplotlib.use("Agg")  # headless: no display on build machines
import matplotlib.pyplot as plt  # noqa: E402


def mean_accuracy(record: ModelRecord) -> Score | None:
    """The mean headline accuracy over tasks; its standard error assumes independent tasks."""
    scores = [task.score(task.headline) for task in record.tasks.values() if task.headline]
    scores = [s for s in scores if s is not None]
    if not scores:
        return None
    known = all(s.stderr is not None for s in scores)
    stderr = math.sqrt(sum(s.stderr**2 for s in scores)) / len(scores) if known else None
    return Score(value=sum(s.value for s in scores) / len(scores), stderr=stderr)


def params_of(record: ModelRecord) -> Score | None:
    return Score(value=record.params) if record.params else None


def throughput_of(record: ModelRecord) -> Score | None:
    return record.throughput.rate if record.throughput else None


def _models(report: FamilyReport, variants: bool = False) -> list[ModelRecord]:
    return [report.teacher, *report.students, *(report.variants if variants else ())]


def bytes_on_disk(report: FamilyReport):
    """A model's safetensors bytes: a variant's own, a member's as its variants' stages read it."""
    members = {variant.member: variant.member_bytes for variant in report.variants if variant.member_bytes}

    def of(record: ModelRecord) -> Score | None:
        found = record.bytes if isinstance(record, VariantRecord) else members.get(record.name)
        return Score(value=found) if found else None
    return of


def accuracy_vs(report: FamilyReport, x_of, xlabel: str, out: Path, variants: bool = False) -> Path | None:
    """Mean accuracy against `x_of` for the teacher and the students (red, blue), with
    `variants` each quantized variant too (green): the family's Pareto view."""
    points = [(x_of(m), mean_accuracy(m), m) for m in _models(report, variants)]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for x, y, model in points:
        name = model.name
        color = "tab:green" if isinstance(model, VariantRecord) else "tab:red" if name == "teacher" else "tab:blue"
        axes.errorbar(x.value, y.value, xerr=x.stderr, yerr=y.stderr, fmt="o", capsize=3, color=color)
        axes.annotate(name, (x.value, y.value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("mean accuracy over tasks (± 1 SE)")
    axes.grid(alpha=0.3)
    return _save(figure, out)


def loss_curves(report: FamilyReport, out: Path) -> Path | None:
    figure, axes = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for student in report.students:
        curve = _read_curve(student.lineage.distillation.loss_curve)
        if curve:
            axes.plot([p[0] for p in curve], [p[1] for p in curve], label=student.name)
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
    """Drawn in memory, then written atomically: a full disk leaves the old picture or none,
    never a truncated PNG."""
    image = io.BytesIO()
    try:
        figure.tight_layout()
        figure.savefig(image, format="png", dpi=110)
    finally:
        plt.close(figure)
    write_bytes_atomic(out, image.getvalue())
    return out
