"""prune: one student's shape cut out of the teacher by the family's importance scores
(builder.pruning.cuts), saved as a plain Hugging Face checkpoint with its pruning map."""
from __future__ import annotations

from pathlib import Path

from builder.models.arch import count_params
from builder.planning.cost_model import STORED_BYTES_PER_PARAM, Costs, StageInputs, Work, stored_model_disk
from builder.spec.shape import Shape
from builder.stages.base import StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    # torch and the models: imported when the stage runs, never when the CLI plans
    from builder.models.loading import load_model, save_model
    from builder.pruning.cuts import prune_model, save_pruning_map
    from builder.pruning.importance import Importance

    teacher_dir = ctx.model_dir("teacher")
    model = load_model(teacher_dir)
    shape, depth_method = Shape(**ctx.config["shape"]), ctx.config["depth_method"]
    importance = Importance.load(Path(ctx.inputs["scores"].summary["importance"]))
    student = prune_model(model, importance, shape, depth_method=depth_method)
    # Stored in float32, not the teacher's dtype: it is what the distillation's float32 master
    # weights start from, so those start from exactly these numbers whatever the teacher's
    # files hold (a bf16 round trip would round them); the distill stage stores the student
    # it hands on in the teacher's dtype, a pruning-only one included.
    save_model(student, teacher_dir, ctx.out_dir / "model")
    kept = save_pruning_map(ctx.out_dir / "model", importance, shape, depth_method)
    summary = {"model_dir": str(ctx.out_dir / "model"), "params": count_params(student.config),
               "shape": shape.as_dict(), "layers_kept": kept["teacher_layers"]}
    return summary, 0


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """Reads the teacher, writes the student (fp32): file work, no FLOPs worth counting."""
    return Work(start_s=costs.stage_start_s, read_bytes=inputs.stored_bytes("teacher"),
                write_bytes=STORED_BYTES_PER_PARAM * count_params(inputs.model), disk=stored_model_disk(inputs.model))


KIND = StageKind("prune", version="1", run=run, resources="light", title="a student's shape cut out of the teacher",
                 estimate=estimate, record="Pruning", card_section="_pruning_text")
