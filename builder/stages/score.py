"""score: Minitron activation importance of every head, neuron, channel and layer of the
teacher, on the calibration split; computed once and read by every student's prune stage."""
from __future__ import annotations

from builder.planning.cost_model import Costs, StageInputs, Work, forward_flops_per_token
from builder.running.placement import place
from builder.spec.schema import FamilySpec
from builder.spec.shape import Shape
from builder.stages.base import Stage, StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    # torch and the models: imported when the stage runs, never when the CLI plans
    from builder.data.prepare import load_blocks
    from builder.models.loading import load_model
    from builder.pruning.importance import score_importance

    scoring = ctx.spec.scoring
    # float32 wherever it runs: the importance (and every cut made from it) is hashed without a precision
    placement = place(ctx.options.use_gpu, "float32")  # before the model loads: a GPU it cannot use fails here
    model = load_model(ctx.model_dir("teacher"), placement.device)
    blocks = load_blocks(ctx.blocks_path(), "calibration", scoring.samples)
    importance = score_importance(
        model, blocks, batch_size=scoring.batch_size, batch_aggregation=scoring.batch_aggregation,
        sequence_aggregation=scoring.sequence_aggregation, lm_loss_samples=scoring.lm_loss_samples)
    importance.save(ctx.out_dir)
    summary = {"importance": str(ctx.out_dir), "samples": len(blocks),
               "block_importance": importance.block.tolist(), "placement": placement.facts()}
    return summary, int(blocks.numel())


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    teacher = inputs.teacher_config
    layers = Shape.of(teacher).num_hidden_layers
    tokens = (config["samples"] + config["lm_loss_samples"] * layers) * seq_len
    return Work(tokens, forward_flops_per_token(teacher, seq_len) * tokens, costs.stage_start_s,
                inputs.stored_bytes("teacher"), forward_memory_of=lambda dtype: memory(teacher, config, execution, seq_len))


def memory(teacher, config: dict, execution: dict, seq_len: int):
    """The score pass's ForwardMemory, in float32 whatever precision the estimate passes (run
    loads the model in float32 wherever it runs); its batches are at most the blocks there are."""
    # torch: only when the plan is estimated (the evaluators' estimates load it already), never when the CLI starts
    from builder.pruning.importance import importance_memory

    batch = execution["batch_size"]  # execution only: outside the hash, in the key
    return importance_memory(teacher, min(batch, config["samples"]), seq_len,
                             lm_loss_batch=min(batch, config["lm_loss_samples"]),
                             sequence_aggregation=config["sequence_aggregation"],
                             batch_aggregation=config["batch_aggregation"])


def planned_tokens(spec: FamilySpec, stage: Stage) -> int:
    return spec.scoring.samples * spec.data.seq_len


KIND = StageKind("score", version="1", run=run, resources="heavy",
                 title="importance of every head, neuron, channel and layer", estimate=estimate,
                 planned_tokens=planned_tokens, record="StageCost", card_section="_compute_section")
