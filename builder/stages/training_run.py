"""What the two training stages (correct, distill) share: a run of builder.training's loop on
Ray Train workers (or, with one worker, in the stage's own task), resuming from the stage's last checkpoint, and its work estimate."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from builder.options.cluster import train_cpus_per_worker
from builder.running.placement import combined
from builder.spec.batching import section_layout
from builder.spec.schema import TrainingSpec
from builder.stages.base import StageContext, StageResult

if TYPE_CHECKING:
    from builder.training.settings import TrainSettings


def train(ctx: StageContext, kind: str, section: TrainingSpec, student_dir: Path | None) -> StageResult:
    """Teacher correction or distillation on --train-workers Ray Train workers (one: in this
    task), resuming from the stage's last checkpoint."""
    from builder.training.ray_train import run_training, worker_nodes  # Ray and torch: when it runs

    options = ctx.options
    settings = dataclasses.replace(
        train_settings(section, options.train_workers, ctx.precision, options.activation_checkpointing),
        stored_dtype=final_dtype(ctx, kind))
    blocks = train_blocks(ctx)
    result = run_training(kind, ctx.model_dir("teacher"), student_dir, blocks, ctx.out_dir,
                          settings, num_workers=options.train_workers, use_gpu=options.use_gpu,
                          parallel=options.parallel, tee_output=options.verbose,
                          cpus_per_worker=train_cpus_per_worker(options))
    layout = {"workers": options.train_workers, "micro_batch_size": settings.batch_size,
              "grad_accum": settings.grad_accum, "global_batch_size": section.global_batch_size}
    nodes = worker_nodes(ctx.out_dir)
    summary = dataclasses.asdict(result) | {"model_dir": result.model_dir, "dtype": settings.dtype,
                                            "stored_dtype": settings.stored_dtype,
                                            "batch": layout, "metrics_file": str(ctx.out_dir / "metrics.jsonl"),
                                            "train_nodes": nodes,
                                            "placement": combined([n["placement"] for n in nodes if "placement" in n])}
    if kind == "distill":  # what the student learned from: the online teacher or a stored signal
        summary["teacher_signal"] = str(blocks) if "signal" in ctx.inputs else "online"
    return summary, result.tokens_seen


def final_dtype(ctx: StageContext, kind: str) -> str:
    """The dtype the stage's final model is stored in. A student's distillation and a corrected
    teacher: the teacher's declared dtype (bf16 for every family here), as the student is
    evaluated, served and published; writing float32 would double its files (an 8B student 32 GB,
    twice its teacher) for digits that no reader of it keeps. A search candidate's light
    distillation: float32, since the chosen student's distillation continues from it and must
    start from its float32 master weights, not a rounding of them (as from the prune stage's)."""
    from builder.models.loading import declared_dtype  # torch: when a stage runs

    if kind == "distill" and ctx.stage.student is None:  # a search candidate
        return "float32"
    return declared_dtype(ctx.model_dir("teacher"))


def train_settings(section: TrainingSpec, workers: int, precision: str,
                   activation_checkpointing: bool = False) -> TrainSettings:
    """The training loop's per-worker settings: the spec's global batch split over `workers`
    (builder.spec.batching), so the step count and the data per step do not depend on them;
    activation checkpointing as the run options say (execution only: --activation-checkpointing)."""
    from builder.training.settings import TrainSettings  # torch: when a stage runs

    layout = section_layout(section, workers)
    return TrainSettings.from_spec(section, dtype=precision, batch_size=layout.micro_batch_size,
                                   grad_accum=layout.grad_accum, activation_checkpointing=activation_checkpointing)


def train_blocks(ctx: StageContext) -> Path:
    """The acquire-data stage dir: training opens its train split with
    `builder.data.tokens.TokenBlocks.open(path, "train")` and memory-maps the shards; for a
    distillation with a stored teacher signal, the teach stage dir (its taught rows, with the
    signal of each: builder.teaching.signal)."""
    if "signal" in ctx.inputs:
        return Path(ctx.inputs["signal"].summary["signal"])
    return ctx.blocks_path()
