"""distill: a pruned student (or a search candidate) learns from the teacher, online or from
the family's stored signal, on Ray Train; resumes from its last checkpoint."""
from __future__ import annotations

from builder.planning.cost_model import (Costs, StageInputs, Work, kd_flops_per_token, memory_of, signal_bytes,
                                         trained_tokens, training_disk, training_writes)
from builder.spec.schema import DistillSpec, FamilySpec
from builder.stages.base import Stage, StageContext, StageKind, StageResult
from builder.stages.training_run import final_dtype, train


def run(ctx: StageContext) -> StageResult:
    section = ctx.section(DistillSpec)
    if section.tokens == 0:  # pruning only: the pruned checkpoint is the result
        return _pruned_as_result(ctx), 0
    return train(ctx, "distill", section, ctx.model_dir("student"))


def _pruned_as_result(ctx: StageContext) -> dict:
    """The pruned checkpoint, stored in the dtype a trained one would be (final_dtype): the prune
    stage writes float32, the masters a distillation starts from. Where that is the dtype
    anyway, the pruned folder itself is handed on, as before."""
    # torch and the models: imported when the stage runs, never when the CLI plans
    from builder.models.loading import declared_dtype, load_model, save_model
    from builder.pruning.cuts import copy_pruning_map
    from builder.training.settings import STORED_DTYPES

    pruned, dtype = ctx.model_dir("student"), final_dtype(ctx, "distill")
    if declared_dtype(pruned) == dtype:
        return {"model_dir": str(pruned), "tokens": 0, "stored_dtype": dtype}
    out = ctx.out_dir / "model"
    save_model(load_model(pruned), pruned, out, dtype=STORED_DTYPES[dtype])
    copy_pruning_map(pruned, out)  # lineage, as a trained student carries it
    return {"model_dir": str(out), "tokens": 0, "stored_dtype": dtype}


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
    # Its final model's disk at fp32 (the default): exact for a search candidate, an upper bound
    # for a student (stored in the teacher's dtype), which the estimate cannot tell apart.
    return Work(tokens, flops * tokens, costs.train_start_s, inputs.stored_bytes("student") + teacher_read,
                training_writes(student, checkpoints), split_read_bytes=signal, checkpoints=checkpoints,
                memory_of=memory_of(student, None if stored else teacher, seq_len),
                disk=training_disk(student, checkpoints))


def planned_tokens(spec: FamilySpec, stage: Stage) -> int:
    if stage.student is None:  # a search candidate's light distillation
        return spec.search.tokens
    student = next(s for s in spec.students if s.name == stage.student)
    return spec.distill_for(student).tokens


# 2: a student's final model stored in the teacher's dtype, not float32, a pruning-only one too
# (issue 24); a search candidate's stays float32
KIND = StageKind("distill", version="2", run=run, resources="training", resumable=True,
                 title="a student distilled from the teacher", estimate=estimate, planned_tokens=planned_tokens,
                 record="Distillation", card_section="_distill_text")
