"""The end of a build: the family table and where everything is.

    model         params  arc_easy        perplexity  speed-up
    teacher       135M    0.300 ± 0.153   42.6        1.00x
    ...
    smollm2-90m-width  weights runs/stages/distill-.../model   card runs/<family>/students/.../README.md

Read from report.json, the build's written record, so the table shows exactly what the
report and the cards say.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from builder.console import display_path
from builder.units import format_count

HEADLINE_METRICS = ("acc_norm", "acc", "exact_match")  # the first a task reports is its score


def load_report(family_dir: Path) -> dict:
    """report.json as written by builder.report (the one place this module reads it)."""
    return json.loads((family_dir / "report.json").read_text())


def score_with_error(metrics: dict, task: str) -> tuple[float, float | None] | None:
    """A task's headline score and its standard error (None where lm-eval has none)."""
    result = metrics.get(task)
    if not isinstance(result, dict):
        return None
    for key in HEADLINE_METRICS:
        if result.get(key) is not None:
            return result[key], result.get(f"{key}_stderr")
    return None


def family_table(report: dict) -> Table:
    models = [m for m in (report.get("teacher_original"), report["teacher"], *report["students"]) if m]
    tasks = _task_names(models)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  title=f"{report['family']} (scores ± one standard error)", title_justify="left")
    for column in ("model", "params", *tasks, "perplexity", "speed-up"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model in models:
        table.add_row(model["name"], _params(model, report), *(_score(model, task) for task in tasks),
                      _perplexity(model), _speed_up(model))
    return table


def _task_names(models: list[dict]) -> list[str]:
    names: list[str] = []
    for model in models:
        names += [name for name in model["metrics"] if name != "perplexity" and name not in names]
    return names


def _params(model: dict, report: dict) -> str:
    return format_count(model.get("params") or report["teacher"]["params"])


def _score(model: dict, task: str) -> str:
    found = score_with_error(model["metrics"], task)
    if found is None:
        return "-"
    value, stderr = found
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def _perplexity(model: dict) -> str:
    value = model["metrics"].get("perplexity")
    return "-" if value is None else f"{value:.1f}"


def _speed_up(model: dict) -> str:
    ratio = (model.get("throughput") or {}).get("ratio_to_teacher")
    return "-" if ratio is None else f"{ratio:.2f}x"


def locations(report: dict, family_dir: Path) -> list[str]:
    """Where each student's weights and card are, and the report."""
    width = max((len(s["name"]) for s in report["students"]), default=0)
    lines = []
    for student in report["students"]:
        weights = display_path(student["path"]) if student.get("path") else "(not built)"
        card = display_path(student["card"]) if student.get("card") else "(none)"
        lines.append(f"{student['name']:<{width}}  weights {weights}  card {card}")
    lines.append(f"report: {display_path(family_dir / 'report.md')} (and report.json, plots/)")
    return lines


def print_summary(console: Console, family_dir: Path) -> None:
    report = load_report(family_dir)
    console.print()
    console.print(family_table(report))
    for line in locations(report, family_dir):
        console.print(line, highlight=False)
