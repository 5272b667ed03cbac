"""acquire-teacher: the teacher as a local safetensors checkpoint (converted from the embedded
GGUF, downloaded from the Hub, or a local folder checked in place)."""
from __future__ import annotations

from pathlib import Path

from builder.models.arch import count_params
from builder.models.teacher import acquire_teacher, config_from_json
from builder.stages.base import StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    summary = acquire_teacher(ctx.spec.teacher, ctx.out_dir)
    summary["params"] = count_params(config_from_json(Path(summary["model_dir"]) / "config.json"))
    return summary, 0


KIND = StageKind("acquire-teacher", version="1", run=run, resources="light",
                 title="the teacher as a local safetensors checkpoint", record="TeacherRecord", card_section="_intro")
