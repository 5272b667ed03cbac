"""The end of a build: the family table and where everything is.

    my-first-family (± one standard error; perplexity with its 95% interval)
    model             params  arc_easy        perplexity               speed-up
    teacher           135M    S ± E           P (95% CI LOW-HIGH)      n/a
    smollm2-108m-mlp  108M    S ± E           P (95% CI LOW-HIGH)      n/a
    smollm2-108m-mlp  weights runs/stages/distill-.../model  card runs/my-first-family/students/.../README.md
    report: wrote runs/my-first-family/report.md (complete)

From the build's FamilyReport (builder.report.records), in the wording report.md and the
cards use (its format_* functions), so the three never disagree.
"""
from __future__ import annotations


from rich import box
from rich.console import Console
from rich.table import Table

from builder.running.console import display_path
from builder.report.records import FamilyReport, ModelRecord, format_perplexity, format_score, format_speedup
from builder.units import format_count


def family_table(report: FamilyReport) -> Table:
    models = [m for m in (report.teacher_original, report.teacher, *report.students) if m is not None]
    tasks = list(dict.fromkeys(name for model in models for name in model.tasks))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left",
                  title=f"{report.family} (± one standard error; perplexity with its 95% interval)")
    for column in ("model", "params", *tasks, "perplexity", "speed-up"):
        table.add_column(column, justify="left" if column in ("model", "perplexity") else "right")
    for model in models:
        table.add_row(model.name, format_count(model.params or report.teacher.params),
                      *(_score(model, task) for task in tasks), format_perplexity(model.perplexity),
                      format_speedup(model.throughput))
    for variant in report.variants:  # a variant's speed-up is over its member, measured in the same run
        speedup = format_speedup(variant.throughput)
        table.add_row(f"{variant.member} {variant.scheme}", format_count(variant.params or report.teacher.params),
                      *(_score(variant, task) for task in tasks), format_perplexity(variant.perplexity),
                      f"{speedup} over {variant.member}" if variant.throughput and variant.throughput.speedup else speedup)
    return table


def _score(model: ModelRecord, task: str) -> str:
    result = model.tasks.get(task)
    if result is None or result.headline is None:
        return "-"
    return format_score(result.score(result.headline))


def locations(report: FamilyReport) -> list[str]:
    """Where each student's weights and card are."""
    width = max((len(student.name) for student in report.students), default=0)
    return [f"{student.name:<{width}}  weights {display_path(student.path) if student.path else '(not built)'}"
            f"  card {display_path(student.card) if student.card else '(not written)'}"
            for student in report.students]


def print_summary(console: Console, report: FamilyReport, note: str) -> None:
    """The table, the locations, and the report's own line (what was written, or kept and why)."""
    console.print()
    console.print(family_table(report))
    for line in locations(report):
        console.print(line, highlight=False)
    for student in report.students:
        if student.gated_out:
            console.print(f"{student.name}: {student.gate_failure_text()}; it will not be published", highlight=False)
    console.print(f"report: {note}", highlight=False)
