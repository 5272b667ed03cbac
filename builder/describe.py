"""The dry run: the plan as a human reads it (stages, shapes, parameters, outputs)."""
from __future__ import annotations

from pathlib import Path

from builder.plan import Plan
from builder.shape import Shape
from builder.store import StageStore
from builder.units import format_count

SHAPE_COLUMNS = ("hidden", "mlp", "heads", "kv", "head_dim", "layers")


def _shape_cells(shape: Shape) -> list[str]:
    return [str(v) for v in (shape.hidden_size, shape.intermediate_size, shape.num_attention_heads,
                             shape.num_key_value_heads, shape.head_dim, shape.num_hidden_layers)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header)] + [line(row) for row in rows]


def render_plan(plan: Plan, store: StageStore, family_dir: Path) -> str:
    spec = plan.spec
    lines = [f"Family {spec.family}: teacher {spec.teacher.source}, data {spec.data.source}", ""]
    header = ["model", "params", "x teacher", *SHAPE_COLUMNS, "depth method"]
    rows = [["teacher", format_count(plan.teacher_params), "1.00", *_shape_cells(plan.teacher_shape), "-"]]
    for student in plan.students:
        depth = student.spec.depth_method if student.shape.num_hidden_layers < plan.teacher_shape.num_hidden_layers else "-"
        rows.append([student.spec.name, format_count(student.params), f"{student.params / plan.teacher_params:.2f}",
                     *_shape_cells(student.shape), depth])
    lines += ["Models (shapes in config.json names; head_dim is kept and written explicitly)"]
    lines += _table(header, rows) + [""]
    lines += ["Stages in run order ([done] = finished earlier, reused as is)"]
    lines += _table(["state", "stage", "tokens", "output"], [_stage_row(plan, stage_id, store) for stage_id in plan.stages])
    lines += ["", f"Family outputs: {family_dir}/report.json, report.md, students/<name>/README.md"]
    return "\n".join(lines)


def _stage_row(plan: Plan, stage_id: str, store: StageStore) -> list[str]:
    stage = plan.stages[stage_id]
    state = "[done]" if store.manifest(stage.key) else ("[resume]" if store.path(stage.key).exists() else "[todo]")
    return [state, stage.name + (f" ({stage.key.label})" if stage.key.label else ""),
            _planned_tokens(plan, stage.name, stage.student), str(store.path(stage.key))]


def _planned_tokens(plan: Plan, stage_name: str, student: str | None) -> str:
    spec = plan.spec
    if stage_name == "correct":
        return format_count(spec.correction.tokens)
    if stage_name == "score":
        return format_count(spec.scoring.samples * spec.data.seq_len)
    if stage_name == "distill":
        student_spec = next(s.spec for s in plan.students if s.spec.name == student)
        return format_count(spec.distill_for(student_spec).tokens)
    return "-"
