"""acquire-data: the data source tokenized into sharded token blocks, per split."""
from __future__ import annotations

from builder.data.prepare import acquire_data
from builder.stages.base import StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    # Tokenizes on Ray Data actors, one per CPU of the stage (cpus_per_stage; 0: the whole
    # cluster); this coordinating task holds no CPU itself (a light stage).
    summary = acquire_data(ctx.spec.data, ctx.model_dir("teacher"), ctx.out_dir, cpus=ctx.options.cpus_per_stage)
    return summary, sum(summary["tokens"].values())


KIND = StageKind("acquire-data", version="2",  # 2: sharded .npy token blocks (builder.data.tokens)
                 run=run, resources="light", title="documents tokenized into token blocks per split",
                 record="FamilyReport", card_section="_data_name")  # the data source, by name
