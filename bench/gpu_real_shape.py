"""bench.gpu's real-shape step: the embedded SmolLM2-135M at the shapes a GPU build runs, so
memory and speed problems that a rehearsal's tiny models hide show on the first lent GPU.

    2,048-token blocks; evaluation batch 16 (perplexity and lm-eval); scoring at batch 4;
    a stored top-256 signal (1,058 bytes a token: 123 blocks a shard, so three shards),
    taught by two actors when two GPUs are there; one width-pruned student distilled on it
    with --train-workers min(GPUs, 2) (FSDP2 with two).

The build runs with --gpus-per-stage 1. The step passes only if the build succeeds, every
computing stage's manifest says it ran on CUDA, and the recorded peak (the highest of its
workers) of each stage the estimate sizes stayed within its per-GPU prediction: the training
stages for the layout they ran (builder.planning.cost_model.training_memory), and the passes
without gradients one batch's forward: the evaluations (evaluators' perplexity_memory and
lm_eval_memory), score (builder.pruning.importance.importance_memory, float32) and each teach
actor (builder.teaching.teach_pass.teach_memory). Every one is judged by the same rule: the
peak at most the prediction.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.gpu_steps import run_step, stages_not_on_cuda

SPEC = """
family: gpu-real-shape
description: bench.gpu's real-shape step (not a family to publish)
teacher: {source: embedded:smollm2-135m-instruct}
data:
  source: embedded:sotu
  seq_len: 2048
  split: {calibration: 0.03, heldout: 0.05, seed: 0}
scoring: {samples: 16, batch_size: 4}
distill:
  tokens: 600K            # 293 blocks: the stored signal's three shards
  global_batch_size: 8
  learning_rate: 3.0e-4
  warmup_steps: 2
  checkpoint_every: 20
  teacher_signal: topk
  top_k: 256
  tail_samples: 16
students:
  - name: width
    shape: {hidden_size: 504, intermediate_size: 960}
evaluation:
  tasks: [{name: arc_easy, limit: 100}]
  batch_size: 16
  perplexity_tokens: 64K
throughput: {enabled: false}  # bench.gpu's throughput step measures vLLM
"""
TRAINING_STAGES = ("correct", "distill")


def real_shape_step(gpus: int, workdir: Path, log_dir: Path, timeout_s: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "gpu-real-shape.yaml"
    spec.write_text(SPEC)
    flags = layout_flags(gpus)
    command = [sys.executable, "-m", "builder.cli", str(spec), "--workdir", str(workdir / "runs"),
               "--gpus-per-stage", "1", *flags]
    step = run_step("real-shape", command, timeout_s, log_dir)
    stages = workdir / "runs" / "stages"
    step["placements"], step["not_on_cuda"] = stages_not_on_cuda(stages)
    step["memory"] = memory_against_estimate(spec, workdir / "runs", flags, stages)
    over = [stage for stage, check in step["memory"].items() if check.get("within") is False]
    step["ok"] = step["ok"] and bool(step["placements"]) and not step["not_on_cuda"] and not over
    return step


def layout_flags(gpus: int) -> list[str]:
    return ["--train-workers", str(min(gpus, 2))] + (["--parallel", "fsdp"] if gpus >= 2 else [])


def memory_against_estimate(spec: Path, workdir: Path, flags: list[str], stages: Path) -> dict[str, dict]:
    """Stage id -> {"peak": measured bytes, "predicted": per-GPU bytes, "within": peak <= predicted}
    for the stages the estimate sizes; {"peak": ...} alone for the other computing stages."""
    predicted = predicted_memory(spec, workdir, flags)
    checks = {}
    for manifest_file in sorted(stages.glob("*/manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        peak = ((manifest.get("summary") or {}).get("placement") or {}).get("peak_memory_bytes")
        if peak is None:
            continue
        stage_id = manifest_file.parent.name
        checks[stage_id] = {"peak": peak}
        if stage_id in predicted:
            checks[stage_id] |= {"predicted": predicted[stage_id], "within": peak <= predicted[stage_id]}
    return checks


def predicted_memory(spec: Path, workdir: Path, flags: list[str]) -> dict[str, float]:
    """Stage id -> the estimate's per-GPU bytes (a training stage's for the layout the build
    ran; the forward of an evaluation, score or teach), planned the way the build planned it
    (the same flags, so the same stage ids)."""
    # the builder's planning imports torch: only once the build has run
    from builder.cli import parse_args
    from builder.family import load_and_plan, planned_teacher_config
    from builder.options.flags import options_from
    from builder.planning.estimate import estimate_plan

    options = options_from(parse_args([str(spec), "--workdir", str(workdir), "--gpus-per-stage", "1", *flags]))
    plan = load_and_plan(spec, options)
    estimate = estimate_plan(plan, planned_teacher_config(plan.spec, spec, options), options)
    sized = {stage.stage: stage.memory[options.parallel]["total"] for stage in estimate.stages
             if stage.name in TRAINING_STAGES and stage.memory}
    return sized | {stage.stage: stage.memory["forward"]["total"] for stage in estimate.stages
                    if "forward" in stage.memory}
