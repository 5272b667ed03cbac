"""`distill.teacher_signal: topk` in the spec and the plan: one teach stage per (top_k,
temperature) that every reading student and search candidate shares, covering the most any
of them reads; a student with the hidden-state loss stays online; the validator names the
field when the spec asks for what cannot work."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from builder.planning.dag import make_plan, stream_positions
from builder.options.precision import Precision
from builder.spec.schema import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K, DistillSpec, FamilySpec
from builder.units import format_count
from builder.planning.validate import check_against_teacher
from tests.tiny_models import TINY_VOCAB, tiny_config

FP32 = Precision("float32", "requested")


def _spec(distill: dict, students: list[dict] | None = None, search: dict | None = None) -> FamilySpec:
    students = students or [{"name": "w", "shape": {"hidden_size": 48}}, {"name": "d", "shape": {"num_hidden_layers": 2}}]
    return FamilySpec.model_validate({
        "family": "tiny", "teacher": {"source": "embedded:smollm2-135m-instruct"}, "data": {"seq_len": 64},
        "distill": {"tokens": "4K", "global_batch_size": 4, **distill}, "students": students,
        **({"search": search} if search else {})})


def _stages(plan, name: str) -> list:
    return [stage for stage in plan.stages.values() if stage.name == name]


def test_every_student_and_candidate_reads_one_shared_teach_stage():
    budget = {"name": "s", "params": 150_000}
    spec = _spec({"teacher_signal": "topk", "top_k": 16, "tail_samples": 8}, [{"name": "w", "shape": {"hidden_size": 48}}, budget],
                 search={"tokens": "1K", "max_candidates": 3, "width_multiple": 16})
    plan = make_plan(spec, tiny_config(), FP32)
    (teach,) = _stages(plan, "teach")
    distills = _stages(plan, "distill")
    candidates = len(plan.students[1].candidates)
    assert candidates >= 2 and len(distills) == 1 + candidates + 1 and all(stage.inputs["signal"] == teach.id for stage in distills)
    assert plan.teach_stages == (teach.id,)
    # It covers the most any reader reads: a student's 4K tokens = 16 steps x 4 blocks of 64.
    assert teach.key.config == {"top_k": 16, "temperature": 1.0, "tail_samples": 8, "positions": 64}
    assert stream_positions(spec.distill, 64) == 64 and stream_positions(spec.search_training(spec.students[1]), 64) == 16


def test_the_teach_stage_does_not_depend_on_who_reads_it():
    """A later build of the family (other students, other seeds) with the same teacher, data,
    top_k and budget reuses the stored signal: its hash holds none of the students."""
    first = make_plan(_spec({"teacher_signal": "topk"}), tiny_config(), FP32)
    other = _spec({"teacher_signal": "topk", "seed": 7, "learning_rate": 1e-3},
                  [{"name": "x", "shape": {"intermediate_size": 64}}])
    (a,), (b,) = _stages(first, "teach"), _stages(make_plan(other, tiny_config(), FP32), "teach")
    assert a.id == b.id
    (bigger,) = _stages(make_plan(_spec({"teacher_signal": "topk", "top_k": DEFAULT_TOP_K + 8}), tiny_config(), FP32),
                        "teach")
    (more_draws,) = _stages(make_plan(_spec({"teacher_signal": "topk", "tail_samples": 3}), tiny_config(), FP32), "teach")
    assert len({a.id, bigger.id, more_draws.id}) == 3


def test_online_students_have_no_teach_stage_and_read_the_data():
    plan = make_plan(_spec({"teacher_signal": "online"}), tiny_config(), FP32)
    assert not _stages(plan, "teach") and all("signal" not in s.inputs for s in _stages(plan, "distill"))


def test_by_default_a_signal_two_distillations_share_is_stored_and_a_lone_one_is_not():
    """teacher_signal auto, the default: topk (with the defaults bench/teach.py chose) where
    two or more distillations read the signal, online for a single student; reverse KL and
    JSD (no draws: the (k+1)-bin form) stay online unless topk is asked for."""
    (teach,) = _stages(make_plan(_spec({}), tiny_config(), FP32), "teach")
    assert (teach.key.config["top_k"], teach.key.config["tail_samples"]) == (DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES)
    alone = _spec({}, [{"name": "w", "shape": {"hidden_size": 48}}])
    assert alone.distill.teacher_signal == "online" and not _stages(make_plan(alone, tiny_config(), FP32), "teach")
    budget = _spec({}, [{"name": "s", "params": 150_000}], search={"tokens": "1K", "width_multiple": 16})
    assert budget.distill.teacher_signal == "topk"  # the search candidates and the winner share it
    # Students that would read different signals (another temperature) share nothing.
    apart = _spec({}, [{"name": "w", "shape": {"hidden_size": 48}},
                       {"name": "d", "shape": {"num_hidden_layers": 2}, "distill": {"tokens": "4K", "temperature": 2.0}}])
    assert [apart.distill_for(s).teacher_signal for s in apart.students] == ["online", "online"]
    for loss in ("reverse_kl", "jsd"):
        assert _spec({"loss": loss}).distill.teacher_signal == "online"
        assert DistillSpec(tokens=100, loss=loss, teacher_signal="topk").stored_signal


def test_a_student_with_the_hidden_state_loss_distills_online():
    hidden = {"name": "d", "shape": {"num_hidden_layers": 2},
              "distill": {"tokens": "4K", "global_batch_size": 4, "hidden_loss_weight": 1.0}}
    spec = _spec({"teacher_signal": "topk"}, [{"name": "w", "shape": {"hidden_size": 48}}, hidden])
    plan = make_plan(spec, tiny_config(), FP32)
    signal = {stage.student: "signal" in stage.inputs for stage in _stages(plan, "distill")}
    assert signal == {"w": True, "d": False} and spec.students[1].distill.teacher_signal == "online"


def test_topk_with_the_hidden_state_loss_is_an_error_naming_both_fields():
    with pytest.raises(ValidationError, match="teacher_signal 'topk' .* hidden_loss_weight 1.0 .*set teacher_signal: online"):
        DistillSpec(tokens=100, teacher_signal="topk", hidden_loss_weight=1.0)


def test_top_k_above_the_vocabulary_is_a_spec_problem():
    spec = _spec({"teacher_signal": "topk", "top_k": TINY_VOCAB + 1})
    (problem,) = [p for p in check_against_teacher(spec, tiny_config()) if p.field.endswith("top_k")]
    assert problem.field == "distill.top_k" and f"top_k <= {TINY_VOCAB}" in problem.message
    from builder.teaching.signal import bytes_per_token

    default_size = bytes_per_token(DEFAULT_TOP_K, TINY_VOCAB, DEFAULT_TAIL_SAMPLES)
    hint = f"the default {DEFAULT_TOP_K}, with {DEFAULT_TAIL_SAMPLES} tail draws, keeps {default_size} bytes"
    assert hint in problem.message


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_tail_samples_are_for_forward_kl_only(loss):
    """Reverse KL and JSD use the (k+1)-bin form: unset, tail_samples follows the loss (0 draws
    stored); asked for, it is an error naming both fields and the fix."""
    assert DistillSpec(tokens=100, teacher_signal="topk", loss=loss).tail_samples == 0
    assert DistillSpec(tokens=100, loss=loss).tail_samples == 0
    assert DistillSpec(tokens=100, teacher_signal="topk").tail_samples > 0  # forward_kl: the default draws
    with pytest.raises(ValidationError, match=f"tail_samples 8 is read only by loss forward_kl, not by loss '{loss}'"
                                              ".*set tail_samples: 0 or loss: forward_kl"):
        DistillSpec(tokens=100, teacher_signal="topk", loss=loss, tail_samples=8)


def test_the_dry_run_names_a_stored_signals_disk_signal_and_tokens_together():
    """The signal of 64 blocks of 64 tokens, top-32 with 32 draws (2-byte ids with the tiny
    vocabulary): 32 x 4 + 2 + 32 x 2 bytes, plus the 2-byte token beside it, per token."""
    from builder.report.dry_run import signal_lines

    plan = make_plan(_spec({"top_k": 32, "tail_samples": 32}), tiny_config(), FP32)
    (line,) = [line for line in signal_lines(plan) if line.startswith("Stored signal")]
    assert f"{format_count(64 * 64 * (32 * 4 + 2 + 32 * 2 + 2))}B on disk for {format_count(64 * 64)} tokens" in line
