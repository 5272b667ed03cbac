"""Chained members (`from:`): the spec refuses unknown parents, self-parents, cycles and parents
given by a budget; phase 2 refuses a shape larger than the parent's; the plan prunes a chained
member from its parent's distilled model, scored again on it, and teaches it by that model,
online or from the parent's own stored signal, so a change upstream recomputes the chain."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from builder.options.precision import Precision
from builder.planning.dag import make_plan
from builder.planning.validate import check_against_teacher
from builder.spec.chains import chain, chain_order, cycles
from builder.spec.schema import FamilySpec
from tests.tiny_models import tiny_config

FP32 = Precision("float32", "requested")
WIDTH = {"name": "width", "shape": {"hidden_size": 48, "intermediate_size": 96}}
CHAIN = {"name": "chain", "from": "width", "shape": {"hidden_size": 32}}


def _spec(students: list[dict], distill: dict | None = None, **sections) -> FamilySpec:
    return FamilySpec.model_validate({
        "family": "tiny", "teacher": {"source": "embedded:smollm2-135m-instruct"}, "data": {"seq_len": 64},
        "distill": {"tokens": "4K", "global_batch_size": 4, "teacher_signal": "online", **(distill or {})},
        "students": students, **sections})


def _error(students: list[dict], **sections) -> str:
    with pytest.raises(ValidationError) as caught:
        _spec(students, **sections)
    return str(caught.value)


def _stage(plan, name: str, label: str):
    (found,) = [stage for stage in plan.stages.values() if stage.name == name and stage.key.label == label]
    return found


def test_unknown_parent_names_the_field_the_value_and_a_close_name():
    message = _error([WIDTH, {**CHAIN, "from": "widht"}])
    assert "students[1].from: 'widht' is no student of this family (did you mean 'width'?)" in message
    assert "remove `from`" in message


def test_a_student_cannot_be_its_own_parent():
    assert "students[0].from: student 'width' names itself" in _error([{**WIDTH, "from": "width"}])


def test_cycles_are_refused_once_each():
    message = _error([{**WIDTH, "from": "chain"}, CHAIN])
    assert message.count("a cycle") == 1 and "width -> chain -> width" in message
    assert cycles({"a": "b", "b": "c", "c": "a", "d": "a"}) == [["a", "b", "c"]]


def test_a_parent_given_by_a_budget_is_refused_with_the_fix():
    budget = {"name": "width", "params": 150_000}
    message = _error([budget, CHAIN], search={"tokens": "1K"})
    assert "students[1].from: 'width' is given by a budget (`params` or `budget`)" in message and "explicit `shape`" in message


def test_chain_order_puts_parents_first_and_chain_reads_the_lineage():
    parents = {"c": "b", "b": "a", "a": None, "x": None}
    assert chain_order(parents) == ["a", "x", "b", "c"] and chain(parents, "c") == ["a", "b", "c"]


def test_from_is_written_back_as_from():
    spec = _spec([WIDTH, CHAIN])
    assert spec.students[1].parent == "width" and spec.model_dump()["students"][1]["from"] == "width"
    assert FamilySpec.model_validate(spec.model_dump()) == spec  # the rehearsal's round trip


def test_a_chained_shape_keeps_the_parents_unset_axes_and_may_not_exceed_them():
    config = tiny_config(head_dim=32)
    plan = make_plan(_spec([WIDTH, CHAIN]), config, FP32)
    assert plan.students[1].shape.intermediate_size == 96  # the parent's, not the teacher's 128
    assert check_against_teacher(_spec([WIDTH, CHAIN]), config) == []
    larger = _spec([WIDTH, {**CHAIN, "shape": {"hidden_size": 56}}])
    (problem,) = check_against_teacher(larger, config)
    assert problem.field == "students[1].shape.hidden_size" and problem.value == 56
    assert "more than its parent 'width''s 48" in problem.message and "hidden_size <= 48" in problem.message


def test_a_chained_shape_no_smaller_than_its_parent_is_refused():
    same = _spec([WIDTH, {**CHAIN, "shape": {"hidden_size": 48}}])
    (problem,) = check_against_teacher(same, tiny_config(head_dim=32))
    assert problem.field == "students[1].shape" and "not fewer than its parent 'width''s" in problem.message


def test_the_chained_member_is_scored_cut_and_taught_from_its_parents_distilled_model():
    plan = make_plan(_spec([CHAIN, WIDTH]), tiny_config(head_dim=32), FP32)  # the child first in the spec
    parent = _stage(plan, "distill", "width")
    scores = _stage(plan, "score", "width")
    assert scores.inputs["teacher"] == parent.id
    assert _stage(plan, "prune", "chain").inputs == {"teacher": parent.id, "scores": scores.id}
    assert _stage(plan, "distill", "chain").inputs["teacher"] == parent.id
    assert [s.spec.name for s in plan.students] == ["chain", "width"]  # the spec's order
    assert list(plan.stages).index(parent.id) < list(plan.stages).index(scores.id)


def test_a_change_upstream_recomputes_the_chain():
    config = tiny_config(head_dim=32)
    first = make_plan(_spec([WIDTH, CHAIN]), config, FP32)
    other_parent = make_plan(_spec([{**WIDTH, "shape": {"hidden_size": 40, "intermediate_size": 96}}, CHAIN]),
                             config, FP32)
    for name in ("prune", "distill"):
        assert _stage(first, name, "chain").id != _stage(other_parent, name, "chain").id
    assert _stage(first, "score", "width").id != _stage(other_parent, "score", "width").id


def test_children_of_one_parent_share_its_own_stored_signal():
    small = {"name": "small", "from": "width", "shape": {"intermediate_size": 64}}
    plan = make_plan(_spec([WIDTH, CHAIN, small], {"teacher_signal": "auto"}), tiny_config(head_dim=32), FP32)
    (teach,) = [stage for stage in plan.stages.values() if stage.name == "teach"]
    assert teach.key.label == "width.k16+16" and teach.inputs["teacher"] == _stage(plan, "distill", "width").id
    assert {_stage(plan, "distill", name).inputs["signal"] for name in ("chain", "small")} == {teach.id}
    assert "signal" not in _stage(plan, "distill", "width").inputs  # the teacher's lone reader stays online
    assert plan.teach_stages == (teach.id,) and plan.taught_by(teach.id) == "width"


def test_a_chained_budget_searches_below_its_parent():
    budget = {"name": "small", "from": "width", "params": 100_000}
    spec = _spec([WIDTH, budget], search={"tokens": "1K", "max_candidates": 3, "width_multiple": 16})
    config = tiny_config(head_dim=32)
    assert check_against_teacher(spec, config) == []
    plan = make_plan(spec, config, FP32)
    parent = _stage(plan, "distill", "width")
    assert all(c.shape.hidden_size <= 48 and c.shape.intermediate_size <= 96 for c in plan.students[1].candidates)
    pruned = [stage for stage in plan.stages.values() if stage.name == "prune" and stage.key.label.startswith("small.")]
    assert pruned and all(stage.inputs["teacher"] == parent.id for stage in pruned)


def test_the_dry_run_shows_the_chain_and_who_teaches_it():
    from builder.report.dry_run import render_models, signal_lines

    plan = make_plan(_spec([WIDTH, CHAIN]), tiny_config(head_dim=32), FP32)
    assert ("  teacher -> width -> chain: chain is pruned from width's distilled model (importance scored on it) "
            "and taught by it") in render_models(plan)
    assert signal_lines(plan)[1].startswith("Teacher signal for chain: its parent width, online")
