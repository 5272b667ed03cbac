"""acquire-data: the data source tokenized into sharded token blocks, per split."""
from __future__ import annotations

from builder.data.prepare import acquire_data
from builder.data.tokens import token_dtype
from builder.planning.cost_model import Costs, Disk, StageInputs, Work
from builder.stages.base import StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    # Tokenizes on Ray Data actors, one per CPU of the stage (cpus_per_stage; 0: the whole
    # cluster); this coordinating task holds no CPU itself (a light stage).
    summary = acquire_data(ctx.spec.data, ctx.model_dir("teacher"), ctx.out_dir, cpus=ctx.options.cpus_per_stage)
    return summary, sum(summary["tokens"].values())


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """Its disk only: `data.max_tokens` token ids of the teacher's vocabulary's width; without
    max_tokens the corpus's size is unknown before it is tokenized (counted as nothing)."""
    size = (config.get("max_tokens") or 0) * token_dtype(inputs.teacher_config.vocab_size).itemsize
    return Work(disk=Disk(peak=size, kept=size))


KIND = StageKind("acquire-data", version="2",  # 2: sharded .npy token blocks (builder.data.tokens)
                 run=run, resources="light", title="documents tokenized into token blocks per split",
                 estimate=estimate, record="FamilyReport", card_section="_data_name")  # the data source, by name
