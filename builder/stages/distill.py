"""distill: a pruned student (or a search candidate) learns from the teacher, online or from
the family's stored signal, on Ray Train; resumes from its last checkpoint."""
from __future__ import annotations

from builder.planning.cost_model import (Costs, StageInputs, Work, kd_flops_per_token, memory_of, signal_bytes,
                                         trained_tokens, training_disk, training_writes)
from builder.spec.schema import DistillSpec, FamilySpec
from builder.stages.base import Stage, StageContext, StageKind, StageResult
from builder.stages.training_run import train


def run(ctx: StageContext) -> StageResult:
    section = ctx.section(DistillSpec)
    if section.tokens == 0:  # pruning only: the pruned checkpoint is the result
        return {"model_dir": str(ctx.model_dir("student")), "tokens": 0}, 0
    return train(ctx, "distill", section, ctx.model_dir("student"))


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """Online: the teacher's forward each step; from a stored signal (teacher_signal: topk):
    no teacher, each worker reads its slice of the signal instead."""
    student, teacher = inputs.model, inputs.teacher_config
    tokens, checkpoints = trained_tokens(config, execution, seq_len)
    stored = config.get("teacher_signal") == "topk"
    per_token = kd_flops_per_token(teacher, student, seq_len)
    flops = per_token["total"] - (per_token["teacher_forward"] if stored else 0)
    signal = signal_bytes(tokens, config, teacher.vocab_size) if stored else 0.0
    teacher_read = 0.0 if stored else inputs.stored_bytes("teacher")
    return Work(tokens, flops * tokens, costs.train_start_s, inputs.stored_bytes("student") + teacher_read,
                training_writes(student, checkpoints), split_read_bytes=signal, checkpoints=checkpoints,
                memory_of=memory_of(student, None if stored else teacher, seq_len),
                disk=training_disk(student, checkpoints))


def planned_tokens(spec: FamilySpec, stage: Stage) -> int:
    if stage.student is None:  # a search candidate's light distillation
        return spec.search.tokens
    student = next(s for s in spec.students if s.name == stage.student)
    return spec.distill_for(student).tokens


KIND = StageKind("distill", version="1", run=run, resources="coordinating", resumable=True,
                 title="a student distilled from the teacher", estimate=estimate, planned_tokens=planned_tokens,
                 record="Distillation", card_section="_distill_text")
