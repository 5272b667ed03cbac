"""teach: the teacher's top-k signal (and its tail draws) over the rows its students will read,
computed once on Ray actors and stored for every distillation that reads it."""
from __future__ import annotations

from builder.models.teacher import config_from_json
from builder.planning.cost_model import Costs, Disk, StageInputs, Work, forward_flops_per_token, signal_bytes
from builder.running.placement import combined
from builder.spec.schema import FamilySpec
from builder.stages.base import Stage, StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    """Resumes at the first shard a killed pass left unwritten."""
    # torch and Ray: imported when the stage runs, never when the CLI plans
    from builder.data.tokens import TokenBlocks
    from builder.teaching.ray_pool import teach_on_ray
    from builder.teaching.signal import SignalLayout
    from builder.teaching.teach_pass import TeachJob, finish

    config, teacher_dir = ctx.config, ctx.model_dir("teacher")
    train = TokenBlocks.open(ctx.blocks_path(), "train")
    vocab_size = config_from_json(teacher_dir / "config.json").vocab_size
    layout = SignalLayout.plan(config["positions"], len(train), train.seq_len, config["top_k"],
                               config["temperature"], vocab_size, config["tail_samples"])
    # Forward passes only: the scoring section's batch size (execution only) sizes them.
    job = TeachJob(str(teacher_dir), str(ctx.blocks_path()), str(ctx.out_dir), layout, dtype=ctx.precision,
                   batch_size=ctx.stage.key.execution["batch_size"], use_gpu=ctx.options.use_gpu)
    taught = teach_on_ray(job, ctx.options)  # [] when every shard was there (a resumed stage)
    workers = {shard["worker"]: shard["placement"] for shard in taught}  # each actor's last report: its peak
    return finish(job) | {"workers": len(workers), "taught_shards": len(taught),
                          "placement": combined(list(workers.values()))}, layout.rows * layout.seq_len


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """The teacher's forward pass, once, over every position a student reads; every worker
    loads the teacher once, and the stage writes the top-k signal."""
    teacher = inputs.teacher_config
    tokens = config["positions"] * seq_len
    signal = signal_bytes(tokens, config, teacher.vocab_size)
    return Work(tokens, forward_flops_per_token(teacher, seq_len) * tokens, costs.train_start_s,
                inputs.stored_bytes("teacher"), signal, disk=Disk(peak=signal, kept=signal),
                forward_memory_of=lambda dtype: memory(teacher, config, execution, dtype, seq_len))


def memory(teacher, config: dict, execution: dict, dtype: str, seq_len: int):
    """One actor's ForwardMemory: the teacher in `dtype` (the training precision), a batch of
    the scoring section's batch size."""
    # torch: only when the plan is estimated (signal_bytes loads it already), never when the CLI starts
    from builder.teaching.teach_pass import teach_memory

    return teach_memory(teacher, dtype, execution["batch_size"], seq_len, config["top_k"], config["tail_samples"],
                        config["temperature"])


def planned_tokens(spec: FamilySpec, stage: Stage) -> int:
    return stage.key.config["positions"] * spec.data.seq_len  # at most: the train split may hold fewer blocks


KIND = StageKind("teach", version="3",  # 3: tail draws on a CPU generator wherever the teacher runs
                 run=run, resources="coordinating", title="the teacher's stored top-k signal, shared by its readers",
                 estimate=estimate, planned_tokens=planned_tokens, record="StageCost", card_section="_compute_section")
