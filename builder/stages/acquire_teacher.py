"""acquire-teacher: the teacher as a local safetensors checkpoint (converted from the embedded
GGUF, downloaded from the Hub, or a local folder checked in place)."""
from __future__ import annotations

from pathlib import Path

from builder.models.arch import count_params
from builder.models.teacher import acquire_teacher, config_from_json
from builder.planning.cost_model import Costs, Disk, StageInputs, Work, config_dtype_bytes, stored_model_disk
from builder.stages.base import StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    summary = acquire_teacher(ctx.spec.teacher, ctx.out_dir)
    summary["params"] = count_params(config_from_json(Path(summary["model_dir"]) / "config.json"))
    return summary, 0


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """Its disk only (a download's time is the network's): the embedded GGUF dequantized to its
    original's dtype (builder.models.teacher.convert_gguf_teacher) and a Hub checkpoint, both
    in the dtype their config declares; a local folder is read in place."""
    source, teacher = config["source"], inputs.teacher_config
    if source.startswith(("embedded:", "hf:")):
        return Work(disk=stored_model_disk(teacher, bytes_per_param=config_dtype_bytes(teacher)))
    return Work(disk=Disk())


# 2: the embedded teacher converted to its original's bfloat16, not float32 (issue 24)
KIND = StageKind("acquire-teacher", version="2", run=run, resources="light",
                 title="the teacher as a local safetensors checkpoint", estimate=estimate, record="TeacherRecord",
                 card_section="_intro")
