"""evaluate: a model's lm-eval benchmarks and held-out perplexity, both on one load of the model:
in transformers for the teacher and the students; for a quantized variant (a quantize stage's
compressed-tensors checkpoint, planned with options["engine"] = "vllm"), in the engine that
serves it, one vLLM engine in a worker process (evaluators.in_vllm), never elsewhere."""
from __future__ import annotations

from pathlib import Path

from builder.planning.cost_model import Costs, StageInputs, Work, one_after_another
from builder.running.placement import place
from builder.spec.schema import EvaluationSpec
from builder.stages.base import VLLM_ENGINE, StageContext, StageKind, StageResult
from builder.store.content import verify_folder
from evaluators.base import Evaluator, ModelHandle
from evaluators.in_vllm import EVALUATION_TIMEOUT_S, evaluate_in_vllm
from evaluators.lm_eval_runner import LmEvalSettings, TaskRequest
from evaluators.perplexity import PerplexitySettings
from evaluators.registry import get_evaluator
from evaluators.throughput import ThroughputSettings


def _evaluations(section: EvaluationSpec, heldout: Path | None = None,
                cache_dir: Path | None = None) -> list[tuple[str, Evaluator, object]]:
    """(summary key, evaluator, its settings) of what `section` asks for, in the order they run.
    `heldout` (the token store) and `cache_dir` (lm-eval's rendered tasks) only where they run."""
    planned: list[tuple[str, Evaluator, object]] = []
    if section.tasks:
        tasks = tuple(TaskRequest(t.name, t.num_fewshot, t.limit) for t in section.tasks)
        planned.append(("metrics", get_evaluator("lm-eval"),
                        LmEvalSettings(tasks, section.task_source, section.batch_size, cache_dir)))
    if section.perplexity_tokens:
        planned.append(("perplexity", get_evaluator("perplexity"),
                        PerplexitySettings(section.perplexity_tokens, section.batch_size, heldout)))
    return planned


def run(ctx: StageContext) -> StageResult:
    if ctx.stage.key.options.get("engine") == VLLM_ENGINE:
        return _run_in_vllm(ctx)
    # Loaded once, by the first evaluator that needs it, in the training precision the planner
    # resolved and hashed: as the training stages hold the model (a bf16 build's models
    # measured in bf16, at half float32's memory); perplexity still accumulates in float32.
    # Placed before any model loads (builder.running.placement).
    placement = place(ctx.options.use_gpu, ctx.precision)
    model = ModelHandle(ctx.model_dir("model"), dtype=placement.dtype)
    # rendered once per work dir and shared: the files are immutable
    cache_dir = Path(ctx.options.workdir) / "cache" / "lm-eval"
    summary: dict = {"metrics": {}}  # no tasks: empty metrics, as the report expects
    for key, evaluator, settings in _evaluations(ctx.section(EvaluationSpec), ctx.blocks_path(), cache_dir):
        summary[key] = evaluator.run(model, settings, placement.device)
    summary["placement"] = placement.facts()  # after the evaluators: its peak memory is theirs
    return summary, _tokens(summary)


def _tokens(summary: dict) -> int:
    """The tokens a stage counts: the held-out blocks' (lm-eval's requests are not counted)."""
    perplexity = summary.get("perplexity")
    return perplexity["blocks"] * perplexity["seq_len"] if perplexity else 0


def _run_in_vllm(ctx: StageContext) -> StageResult:
    """A variant's evaluators on one vLLM engine, in the training precision (as its bf16 member
    was evaluated; vLLM computes in it around the quantized matmuls), with the family's vLLM
    engine arguments (throughput.engine_args: execution only, as for the throughput stage)."""
    placement = place(ctx.options.use_gpu, ctx.precision, computes_here=False)  # vLLM computes in its own processes
    source = ctx.model_dir("model")
    verify_folder(source)  # the worker reads it in its own process: checked here first
    cache_dir = Path(ctx.options.workdir) / "cache" / "lm-eval"
    evaluations = [(key, evaluator.name, settings)
                   for key, evaluator, settings in _evaluations(ctx.section(EvaluationSpec), ctx.blocks_path(), cache_dir)]
    engine = ThroughputSettings(dtype=placement.dtype, engine_args=dict(ctx.spec.throughput.engine_args),
                                timeout_s=EVALUATION_TIMEOUT_S)
    found = evaluate_in_vllm(ModelHandle(source, ctx.stage.key.label), evaluations, engine, ctx.out_dir / "vllm")
    summary = {"metrics": {}, **found, "placement": placement.facts()}
    return summary, _tokens(summary)


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """The evaluators' work on this stage's model, after the stage's start and its checkpoint's read
    (and a variant's vLLM engine start: its model comes from a quantize stage)."""
    section = EvaluationSpec.model_validate({**config, **execution})
    works = [evaluator.estimate(settings, inputs.model, costs, seq_len)
             for _, evaluator, settings in _evaluations(section)]
    in_vllm = inputs.producers.get("model") == "quantize"
    return one_after_another(works, costs.stage_start_s + (costs.vllm_start_s if in_vllm else 0.0),
                             inputs.stored_bytes("model"))


# 2: perplexity's nll_stderr; 3: the model in the training precision, not float32 (a bfloat16
# build's scores change; the LM head in chunks alone changes perplexity by float rounding only)
KIND = StageKind("evaluate", version="3",
                 run=run, resources="heavy", title="lm-eval benchmarks and held-out perplexity (a variant's in vLLM)",
                 estimate=estimate, record="ModelRecord", card_section="_eval_section")
