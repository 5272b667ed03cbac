"""correct: teacher correction, the teacher fine-tuned on the family's data before it teaches
(the second Minitron paper's fix for data far from the teacher's own); optional in the spec."""
from __future__ import annotations

from builder.planning.cost_model import (Costs, StageInputs, Work, config_dtype_bytes, forward_flops_per_token, memory_of,
                                         trained_tokens, training_disk, training_writes)
from builder.spec.schema import FamilySpec
from builder.stages.base import Stage, StageContext, StageKind, StageResult
from builder.stages.training_run import train


def run(ctx: StageContext) -> StageResult:
    return train(ctx, "correct", ctx.spec.correction, None)


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    teacher = inputs.teacher_config
    tokens, checkpoints = trained_tokens(config, execution, seq_len)
    stored = config_dtype_bytes(teacher)  # the corrected teacher is stored in the teacher's dtype
    return Work(tokens, 3 * forward_flops_per_token(teacher, seq_len) * tokens, costs.train_start_s,
                inputs.stored_bytes("teacher"), training_writes(teacher, checkpoints, stored), checkpoints=checkpoints,
                memory_of=memory_of(teacher, None, seq_len), disk=training_disk(teacher, checkpoints, stored))


def planned_tokens(spec: FamilySpec, stage: Stage) -> int:
    return spec.correction.tokens


# 2: the corrected teacher stored in the teacher's dtype, not float32 (issue 24)
KIND = StageKind("correct", version="2", run=run, resources="training", resumable=True,
                 title="teacher correction on the family's data", estimate=estimate,
                 planned_tokens=planned_tokens, record="StageCost", card_section="_compute_section")
