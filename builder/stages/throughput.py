"""throughput: vLLM generation speed of the teacher, every student and every quantized variant
(a role "<model>.<scheme>"), measured in the same run at the same workload so the speed-ups are
ratios; optional (its failure is reported, the family still builds)."""
from __future__ import annotations

from builder.planning.cost_model import Costs, StageInputs, Work, one_after_another
from builder.running.placement import place
from builder.spec.schema import ThroughputSpec
from builder.stages.base import StageContext, StageKind, StageResult
from builder.store.content import verify_folder
from evaluators.base import ModelHandle
from evaluators.registry import get_evaluator
from evaluators.throughput import ThroughputRun, ThroughputSettings, add_ratios, model_work_dir


def _workload(section: ThroughputSpec) -> ThroughputSettings:
    return ThroughputSettings(input_len=section.input_len, output_len=section.output_len,
                              num_prompts=section.num_prompts, dtype=section.dtype,
                              engine_args=dict(section.engine_args))


def run(ctx: StageContext) -> StageResult:
    evaluator, workload = get_evaluator("vllm-throughput"), _workload(ctx.section(ThroughputSpec))
    # Checked before any engine starts; vLLM computes in its own processes, so no peak is measured here.
    placement = place(ctx.options.use_gpu, workload.dtype, computes_here=False)
    for role in ctx.inputs:  # vLLM reads the models in its own processes: checked here first
        verify_folder(ctx.model_dir(role))
    results = {role: evaluator.run(ModelHandle(ctx.model_dir(role), role),
                                   ThroughputRun(workload, model_work_dir(ctx.out_dir, index, role)),
                                   placement.device)
               for index, role in enumerate(ctx.inputs)}
    return {"results": add_ratios(results), "placement": placement.facts()}, 0


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """One vLLM engine per measured model, one after another."""
    evaluator, roles = get_evaluator("vllm-throughput"), inputs.measured()
    settings = ThroughputRun(_workload(ThroughputSpec.model_validate({**config, **execution})))
    works = [evaluator.estimate(settings, inputs.config(role), costs, seq_len) for role in roles]
    return one_after_another(works, costs.stage_start_s, sum(inputs.stored_bytes(role) for role in roles))


KIND = StageKind("throughput", version="2",  # 2: several timed passes: mean, spread, machine load
                 run=run, resources="heavy", optional=True, title="vLLM tokens/s of the teacher, every student and every variant",
                 estimate=estimate, record="Throughput", card_section="_throughput_section")
