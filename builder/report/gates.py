"""Quality gates, judged from the report's own records: a student whose score on a gated task
falls below `min_score_ratio` times the teacher's, or whose held-out perplexity rises above
`max_perplexity_ratio` times the teacher's, is gated out (records.StudentRecord.gated_out):
the report and its card say so with the numbers, `publish` refuses it, the build exits with
GATE_FAILED_EXIT_CODE.

The teacher is the family's (the corrected teacher, when a correction ran), as every Δ in the
report: a chained member's floors too are against it, not against its parent. Gates are in no stage's hash, so a changed gate
is judged again from finished results (`build-family report`, `publish`, the next build)
and nothing is recomputed.
"""
from __future__ import annotations

from builder.report.records import FamilyReport, GateCheck, ModelRecord, StudentRecord
from builder.spec.schema import FamilySpec, GatesSpec

GATE_FAILED_EXIT_CODE = 3  # builder/cli.py's docstring and docs/writing-a-family.md list it


def judged(report: FamilyReport, spec: FamilySpec) -> FamilyReport:
    """The report with each student's gates judged by `spec` (replacing any judged before)."""
    gates = {student.name: spec.gates_for(student) for student in spec.students}
    students = [student.model_copy(update={"gates": judge(student, report.teacher, gates[student.name])})
                if student.name in gates else student for student in report.students]
    return report.model_copy(update={"students": students})


def judge(student: ModelRecord, teacher: ModelRecord, gates: GatesSpec) -> list[GateCheck]:
    checks = [_score_check(student, teacher, task, floor) for task, floor in gates.min_score_ratio.items()]
    if gates.max_perplexity_ratio is not None:
        checks.append(_perplexity_check(student, teacher, gates.max_perplexity_ratio))
    return checks


def _score_check(student: ModelRecord, teacher: ModelRecord, task: str, floor: float) -> GateCheck:
    # The teacher's headline metric names the measure, so both sides compare the same one.
    metric = teacher.tasks[task].headline if task in teacher.tasks else None
    mine, theirs = _score(student, task, metric), _score(teacher, task, metric)
    # student >= floor x teacher rather than a ratio: a teacher scoring 0 leaves nothing to divide by
    passed = mine is not None and theirs is not None and mine >= floor * theirs
    return GateCheck(gate="min_score_ratio", measure=f"{task} {metric or 'score'}", limit=floor,
                     student=mine, teacher=theirs, passed=passed)


def _score(model: ModelRecord, task: str, metric: str | None) -> float | None:
    result = model.tasks.get(task)
    if result is None or metric is None or result.error:
        return None
    return result.scores.get(metric)


def _perplexity_check(student: ModelRecord, teacher: ModelRecord, ceiling: float) -> GateCheck:
    mine = student.perplexity.perplexity if student.perplexity else None
    theirs = teacher.perplexity.perplexity if teacher.perplexity else None
    passed = mine is not None and theirs is not None and mine <= ceiling * theirs
    return GateCheck(gate="max_perplexity_ratio", measure="held-out perplexity", limit=ceiling,
                     student=mine, teacher=theirs, passed=passed)


def gated_out(report: FamilyReport) -> list[StudentRecord]:
    return [student for student in report.students if student.gated_out]


def describe_gates(gates: GatesSpec) -> str:
    """A student's gates in words, for the dry run."""
    if gates.is_empty:
        return "no quality gate"
    words = [f"{task} score at least {floor:g} x the teacher's" for task, floor in gates.min_score_ratio.items()]
    if gates.max_perplexity_ratio is not None:
        words.append(f"held-out perplexity at most {gates.max_perplexity_ratio:g} x the teacher's")
    return "; ".join(words)
