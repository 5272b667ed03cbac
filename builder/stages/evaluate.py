"""evaluate: a model's lm-eval benchmarks and held-out perplexity."""
from __future__ import annotations

from pathlib import Path

from builder.planning.cost_model import (Costs, StageInputs, Work, forward_flops_per_token, lm_eval_tokens,
                                         subtasks)
from builder.spec.schema import EvaluationSpec
from builder.stages.base import StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    # torch, lm-eval and the models: imported when the stage runs, never when the CLI plans
    from builder.data.prepare import load_blocks
    from evaluators.lm_eval_runner import TaskRequest, evaluate_model
    from evaluators.perplexity import heldout_perplexity

    evaluation = ctx.section(EvaluationSpec)
    device = ctx.options.device()
    tasks = [TaskRequest(t.name, t.num_fewshot, t.limit) for t in evaluation.tasks]
    metrics = evaluate_model(ctx.model_dir("model"), tasks, batch_size=evaluation.batch_size, device=device,
                             source=evaluation.task_source,
                             # rendered once per work dir and shared: the files are immutable
                             cache_dir=Path(ctx.options.workdir) / "cache" / "lm-eval") if tasks else {}
    summary = {"metrics": metrics}
    tokens = 0
    if evaluation.perplexity_tokens:
        seq_len = ctx.spec.data.seq_len
        blocks = load_blocks(ctx.blocks_path(), "heldout", max(1, evaluation.perplexity_tokens // seq_len))
        summary["perplexity"] = heldout_perplexity(ctx.model_dir("model"), blocks, batch_size=evaluation.batch_size,
                                                   device=device)
        tokens = int(blocks.numel())
    return summary, tokens


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """lm-eval's tasks (each forward at its own length) and the held-out perplexity."""
    model, tasks = inputs.model, config.get("tasks", [])
    tokens = config["perplexity_tokens"]
    flops = forward_flops_per_token(model, seq_len) * tokens
    for task in tasks:
        task_tokens, length = lm_eval_tokens(task)
        tokens, flops = tokens + task_tokens, flops + forward_flops_per_token(model, length) * task_tokens
    start = costs.stage_start_s + (costs.lm_eval_start_s + costs.lm_eval_task_s * subtasks(tasks) if tasks else 0)
    return Work(tokens, flops, start, inputs.stored_bytes("model"))


KIND = StageKind("evaluate", version="2",  # 2: perplexity's nll_stderr
                 run=run, resources="heavy", title="lm-eval benchmarks and held-out perplexity",
                 estimate=estimate, record="ModelRecord", card_section="_eval_section")
