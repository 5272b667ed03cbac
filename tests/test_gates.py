"""Quality gates judged from the report's records (builder/report/gates.py): which student
passes, which is gated out and with what numbers, what the dry run says, and that a gate
changes no stage's hash (a changed gate re-judges; it never recomputes).

The report, card and publish side is in tests/test_report.py and tests/test_hub.py; a real
build that a gate fails is in tests/test_e2e.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from builder.models.teacher import config_from_json
from builder.options.precision import Precision
from builder.planning.dag import make_plan
from builder.report.dry_run import gate_lines
from builder.report.gates import describe_gates, judge
from builder.report.records import ModelRecord, Perplexity, StudentRecord, TaskResult
from builder.spec.schema import FamilySpec, GatesSpec

SMOLLM2_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "configs" / "SmolLM2-135M-Instruct.json"


def model(acc_norm: float | None = 0.5, acc: float = 0.6, perplexity: float | None = 20.0) -> ModelRecord:
    scores = {"acc": acc} | ({"acc_norm": acc_norm} if acc_norm is not None else {})
    return ModelRecord(name="m", tasks={"arc_easy": TaskResult(scores=scores, samples=100)},
                       perplexity=Perplexity(perplexity=perplexity) if perplexity is not None else None)


TEACHER = model()


def test_a_score_gate_compares_the_headline_metric_with_the_teachers():
    gates = GatesSpec(min_score_ratio={"arc_easy": 0.9})
    [check] = judge(model(acc_norm=0.44, acc=0.9), TEACHER, gates)  # acc_norm is the headline, not acc
    assert (check.measure, check.student, check.teacher, check.ratio) == ("arc_easy acc_norm", 0.44, 0.5, 0.88)
    assert not check.passed
    assert check.text() == "arc_easy acc_norm 0.44 / teacher's 0.5 = 0.880, below the floor 0.9"
    [check] = judge(model(acc_norm=0.45), TEACHER, gates)  # exactly at the floor passes
    assert check.passed and "within the floor 0.9" in check.text()


def test_without_acc_norm_the_gate_judges_acc():
    [check] = judge(model(acc_norm=None, acc=0.3), model(acc_norm=None, acc=0.6), GatesSpec(min_score_ratio={"arc_easy": 0.5}))
    assert check.measure == "arc_easy acc" and check.passed and check.ratio == 0.5


def test_a_perplexity_gate_is_a_ceiling_on_the_ratio():
    gates = GatesSpec(max_perplexity_ratio=1.5)
    [above] = judge(model(perplexity=31.0), TEACHER, gates)
    assert not above.passed and above.ratio == pytest.approx(1.55)
    assert above.text() == "held-out perplexity 31 / teacher's 20 = 1.550, above the maximum 1.5"
    [within] = judge(model(perplexity=30.0), TEACHER, gates)
    assert within.passed


def test_a_teacher_scoring_zero_is_met_by_any_score():
    [check] = judge(model(acc_norm=0.0), model(acc_norm=0.0), GatesSpec(min_score_ratio={"arc_easy": 0.9}))
    assert check.passed and check.ratio is None


def test_a_gate_that_could_not_be_measured_does_not_pass():
    unevaluated = ModelRecord(name="m", evaluation_error="lm-eval crashed")
    checks = judge(unevaluated, TEACHER, GatesSpec(min_score_ratio={"arc_easy": 0.1}, max_perplexity_ratio=100))
    assert [check.passed for check in checks] == [False, False]
    assert "not measured" in checks[0].text() and "cannot pass" in checks[1].text()


def test_a_student_is_gated_out_by_any_failed_gate_and_names_each():
    gates = GatesSpec(min_score_ratio={"arc_easy": 0.9}, max_perplexity_ratio=1.5)
    student = StudentRecord(name="s", gates=judge(model(acc_norm=0.5, perplexity=40.0), TEACHER, gates))
    assert student.gated_out and [check.gate for check in student.gate_failures] == ["max_perplexity_ratio"]
    assert student.gate_failure_text() == ("failed its quality gate: held-out perplexity 40 / teacher's 20 = 2.000, "
                                           "above the maximum 1.5")
    assert not StudentRecord(name="ungated").gated_out


SPEC = {"family": "tiny", "teacher": {"source": "embedded:smollm2-135m-instruct"}, "distill": {"tokens": "48K"},
        "students": [{"name": "width", "shape": {"hidden_size": 504}},
                     {"name": "depth", "shape": {"num_hidden_layers": 17}, "gates": {}}],
        "evaluation": {"tasks": [{"name": "arc_easy"}], "perplexity_tokens": "4K"}}
GATES = {"min_score_ratio": {"arc_easy": 0.9}, "max_perplexity_ratio": 1.5}


def plan(**sections):
    return make_plan(FamilySpec.model_validate({**SPEC, **sections}), config_from_json(SMOLLM2_CONFIG),
                     Precision("float32", "test"))


def test_gates_are_in_no_stage_hash():
    ungated, gated = plan(), plan(gates=GATES)
    assert {i: s.key.digest for i, s in gated.stages.items()} == {i: s.key.digest for i, s in ungated.stages.items()}
    students = [{**SPEC["students"][0], "gates": {"max_perplexity_ratio": 1.1}}, SPEC["students"][1]]
    assert plan(students=students).stages.keys() == ungated.stages.keys()


def test_the_dry_run_states_each_students_gates_in_words():
    assert gate_lines(plan()) == []
    lines = gate_lines(plan(gates=GATES))
    assert "exits with code 3" in lines[0]
    assert lines[1:3] == ["  width: arc_easy score at least 0.9 x the teacher's; held-out perplexity at most 1.5 x "
                          "the teacher's", "  depth: no quality gate"]
    assert describe_gates(GatesSpec()) == "no quality gate"


def test_a_rehearsal_judges_no_gate():
    """Its teacher is random, and a gated Hub-only task may be left out of it."""
    from builder.models.arch import count_params
    from builder.spec.rehearsal_scale import Scale, rehearsal_shape, rehearse_spec
    from builder.spec.shape import Shape

    config = config_from_json(SMOLLM2_CONFIG)
    real = Shape.of(config)
    by_family = FamilySpec.model_validate({**SPEC, "gates": GATES})
    by_student = FamilySpec.model_validate({**SPEC, "students": [{**SPEC["students"][0], "gates": GATES},
                                                                 SPEC["students"][1]]})
    for spec in (by_family, by_student):
        rehearsal, notes = rehearse_spec(spec, real, rehearsal_shape(real, Scale.of(real)), (count_params(config), 10**6),
                                         teacher_dir="/rehearsal/teacher", data={"source": "embedded:sotu"},
                                         train_workers=1, available_tasks=None, with_throughput=False)
        assert all(rehearsal.gates_for(student).is_empty for student in rehearsal.students) and notes["gates_left_out"]
