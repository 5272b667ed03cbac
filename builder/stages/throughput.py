"""throughput: vLLM generation speed of the teacher and every student, measured in the same
run so the speed-ups are ratios; optional (its failure is reported, the family still builds)."""
from __future__ import annotations

from pathlib import Path

from builder.planning.cost_model import Costs, StageInputs, Work, forward_flops_per_token
from builder.stages.base import StageContext, StageKind, StageResult
from builder.store.content import verify_folder
from evaluators.throughput import ThroughputSettings, measure_throughput


def run(ctx: StageContext) -> StageResult:
    section = ctx.spec.throughput
    settings = ThroughputSettings(input_len=section.input_len, output_len=section.output_len,
                                  num_prompts=section.num_prompts, dtype=section.dtype,
                                  engine_args=dict(section.engine_args))
    models = {name: Path(manifest.summary["model_dir"]) for name, manifest in ctx.inputs.items()}
    for model_dir in models.values():  # vLLM reads them in its own processes: checked here first
        verify_folder(model_dir)
    results = measure_throughput(models, settings, ctx.out_dir)
    return {"results": results}, 0


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """One vLLM engine per measured model, one after another."""
    length = config["input_len"] + config["output_len"]
    roles = inputs.measured()
    per_model = config["num_prompts"] * length
    flops = sum(per_model * forward_flops_per_token(inputs.config(role), length) for role in roles)
    return Work(per_model * len(roles), flops, costs.stage_start_s + costs.vllm_start_s * len(roles),
                sum(inputs.stored_bytes(role) for role in roles))


KIND = StageKind("throughput", version="2",  # 2: several timed passes: mean, spread, machine load
                 run=run, resources="heavy", optional=True, title="vLLM tokens/s of the teacher and every student",
                 estimate=estimate, record="Throughput", card_section="_throughput_section")
