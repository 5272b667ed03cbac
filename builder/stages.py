"""Stage functions: plain functions from a StageContext to (summary, tokens processed).

Each one reads its upstream stages' manifests, writes only inside `ctx.out_dir`, and
returns a JSON-able summary that becomes its manifest. The runner decides where and when
they run (Ray tasks); these functions never import Ray.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import torch
from pydantic import BaseModel

from builder.options import RunOptions
from builder.shape import Shape
from builder.spec import DistillSpec, EvaluationSpec, FamilySpec, TrainingSpec
from builder.store import Manifest, StageStore

if TYPE_CHECKING:  # builder.plan reads STAGE_VERSIONS from here
    from builder.training import TrainSettings
    from builder.plan import Stage

Section = TypeVar("Section", bound=BaseModel)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    stage: Stage
    spec: FamilySpec
    options: RunOptions
    out_dir: Path
    inputs: dict[str, Manifest]  # role -> finished upstream stage

    def model_dir(self, role: str) -> Path:
        return Path(self.inputs[role].summary["model_dir"])

    def blocks_path(self) -> Path:
        return Path(self.inputs["data"].summary["blocks"])

    @property
    def config(self) -> dict:
        """The settings this stage's result depends on: what its hash covers."""
        return self.stage.key.config

    def section(self, model: type[Section]) -> Section:
        """The spec section this stage was planned with, execution-only fields included."""
        return model.model_validate({**self.stage.key.config, **self.stage.key.execution})

    @property
    def precision(self) -> str:
        """The training precision the planner resolved and hashed (never re-resolved here)."""
        return self.stage.key.options["precision"]


StageResult = tuple[dict, int]  # (summary, tokens processed)


def execute_stage(stage: Stage, spec: FamilySpec, options: RunOptions, inputs: dict[str, Manifest],
                  node: dict | None = None) -> Manifest:
    store = StageStore(options.workdir)
    if stage.heavy:  # the CPUs the runner reserved for it (see runner._resources)
        torch.set_num_threads(options.stage_cpus())
    ctx = StageContext(stage, spec, options, store.prepare(stage.key), inputs)
    log.info("started  %s", stage.id)
    started = time.perf_counter()
    summary, tokens = STAGE_FUNCTIONS[stage.name](ctx)
    if node is not None:  # where it ran (hostname, Ray node id): the runner says
        summary["node"] = node
    if options.rehearsal:  # never to be mistaken for, or reused as, a real result
        summary["rehearsal"] = True
    # The manifest is written last: from here on the stage counts as finished.
    return store.finish(stage.key, time.perf_counter() - started, tokens, summary)


def acquire_teacher_stage(ctx: StageContext) -> StageResult:
    from builder.acquire import acquire_teacher
    from builder.arch import count_params
    from builder.acquire import config_from_json

    summary = acquire_teacher(ctx.spec.teacher, ctx.out_dir)
    summary["params"] = count_params(config_from_json(Path(summary["model_dir"]) / "config.json"))
    return summary, 0


def acquire_data_stage(ctx: StageContext) -> StageResult:
    from builder.acquire import acquire_data

    # Tokenizes on Ray Data actors, one per CPU of the stage (cpus_per_stage; 0: the whole
    # cluster); this coordinating task holds no CPU itself (runner._resources: light stage).
    summary = acquire_data(ctx.spec.data, ctx.model_dir("teacher"), ctx.out_dir,
                           cpus=ctx.options.cpus_per_stage)
    return summary, sum(summary["tokens"].values())


def _train(ctx: StageContext, kind: str, section: TrainingSpec, student_dir: Path | None) -> StageResult:
    """Teacher correction or distillation on Ray Train, resuming from the stage's last checkpoint."""
    import dataclasses

    from builder.cluster import train_cpus_per_worker
    from builder.ray_train import run_on_ray_train, worker_nodes

    options = ctx.options
    settings = train_settings(section, options.train_workers, ctx.precision)
    result = run_on_ray_train(kind, ctx.model_dir("teacher"), student_dir, _train_blocks(ctx), ctx.out_dir,
                              settings, num_workers=options.train_workers, use_gpu=options.use_gpu,
                              parallel=options.parallel, tee_output=options.verbose,
                              cpus_per_worker=train_cpus_per_worker(options))
    layout = {"workers": options.train_workers, "micro_batch_size": settings.batch_size,
              "grad_accum": settings.grad_accum, "global_batch_size": section.global_batch_size}
    summary = dataclasses.asdict(result) | {"model_dir": result.model_dir, "dtype": settings.dtype,
                                            "batch": layout, "metrics_file": str(ctx.out_dir / "metrics.jsonl"),
                                            "train_nodes": worker_nodes(ctx.out_dir)}
    if kind == "distill":  # what the student learned from: the online teacher or a stored signal
        summary["teacher_signal"] = str(_train_blocks(ctx)) if "signal" in ctx.inputs else "online"
    return summary, result.tokens_seen


def train_settings(section: TrainingSpec, workers: int, precision: str) -> "TrainSettings":
    """The training loop's per-worker settings: the spec's global batch split over `workers`
    (builder.batching), so the step count and the data per step do not depend on them."""
    from builder.batching import section_layout
    from builder.training import TrainSettings

    layout = section_layout(section, workers)
    return TrainSettings.from_spec(section, dtype=precision, batch_size=layout.micro_batch_size,
                                   grad_accum=layout.grad_accum)


def _train_blocks(ctx: StageContext) -> Path:
    """The acquire-data stage dir: training opens its train split with
    `builder.tokens.TokenBlocks.open(path, "train")` and memory-maps the shards; for a
    distillation with a stored teacher signal, the teach stage dir (its taught rows, with the
    signal of each: builder.teacher_signal)."""
    if "signal" in ctx.inputs:
        return Path(ctx.inputs["signal"].summary["signal"])
    return ctx.blocks_path()


def correct_stage(ctx: StageContext) -> StageResult:
    return _train(ctx, "correct", ctx.spec.correction, None)


def teach_stage(ctx: StageContext) -> StageResult:
    """The teacher's top-k signal over the rows its students will read, computed once, on Ray
    actors (builder.ray_teach), resuming at the first shard a killed pass left unwritten."""
    from builder.acquire import config_from_json
    from builder.ray_teach import teach_on_ray
    from builder.teach import TeachJob, finish
    from builder.teacher_signal import SignalLayout
    from builder.tokens import TokenBlocks

    config, teacher_dir = ctx.config, ctx.model_dir("teacher")
    train = TokenBlocks.open(ctx.blocks_path(), "train")
    vocab_size = config_from_json(teacher_dir / "config.json").vocab_size
    layout = SignalLayout.plan(config["positions"], len(train), train.seq_len, config["top_k"],
                               config["temperature"], vocab_size, config["tail_samples"])
    # Forward passes only: the scoring section's batch size (execution only) sizes them.
    job = TeachJob(str(teacher_dir), str(ctx.blocks_path()), str(ctx.out_dir), layout, dtype=ctx.precision,
                   batch_size=ctx.spec.scoring.batch_size, use_gpu=ctx.options.use_gpu)
    taught = teach_on_ray(job, ctx.options)  # [] when every shard was there (a resumed stage)
    return finish(job) | {"workers": len({shard["worker"] for shard in taught}),
                          "taught_shards": len(taught)}, layout.rows * layout.seq_len


def score_stage(ctx: StageContext) -> StageResult:
    from builder.acquire import load_blocks
    from builder.importance import score_importance
    from builder.model_io import load_model

    scoring = ctx.spec.scoring
    model = load_model(ctx.model_dir("teacher"))
    blocks = load_blocks(ctx.blocks_path(), "calibration", scoring.samples)
    importance = score_importance(
        model, blocks, batch_size=scoring.batch_size, batch_aggregation=scoring.batch_aggregation,
        sequence_aggregation=scoring.sequence_aggregation, lm_loss_samples=scoring.lm_loss_samples)
    importance.save(ctx.out_dir)
    summary = {"importance": str(ctx.out_dir), "samples": len(blocks),
               "block_importance": importance.block.tolist()}
    return summary, int(blocks.numel())


def prune_stage(ctx: StageContext) -> StageResult:
    from builder.arch import count_params
    from builder.importance import Importance
    from builder.model_io import load_model, save_model
    from builder.prune import prune_model, save_pruning_map

    teacher_dir = ctx.model_dir("teacher")
    model = load_model(teacher_dir)
    shape, depth_method = Shape(**ctx.config["shape"]), ctx.config["depth_method"]
    importance = Importance.load(Path(ctx.inputs["scores"].summary["importance"]))
    student = prune_model(model, importance, shape, depth_method=depth_method)
    save_model(student, teacher_dir, ctx.out_dir / "model")
    kept = save_pruning_map(ctx.out_dir / "model", importance, shape, depth_method)
    summary = {"model_dir": str(ctx.out_dir / "model"), "params": count_params(student.config),
               "shape": shape.as_dict(), "layers_kept": kept["teacher_layers"]}
    return summary, 0


def distill_stage(ctx: StageContext) -> StageResult:
    section = ctx.section(DistillSpec)
    if section.tokens == 0:  # pruning only: the pruned checkpoint is the result
        return {"model_dir": str(ctx.model_dir("student")), "tokens": 0}, 0
    return _train(ctx, "distill", section, ctx.model_dir("student"))


def select_stage(ctx: StageContext) -> StageResult:
    """Architecture search: keep the candidate with the lowest held-out loss after its light
    distillation; the student's full distillation continues from that checkpoint."""
    table = [_candidate_row(ctx, index) for index in range(len(ctx.config["candidates"]))]
    best = min(range(len(table)), key=lambda index: table[index]["heldout_loss"])
    chosen = table[best]
    summary = {"model_dir": chosen["model_dir"], "shape": chosen["shape"], "params": chosen["params"],
               "layers_kept": chosen["layers_kept"], "chosen": best, "candidates": table}
    log.info("search for %s: chose %s (held-out loss %.4f) of %d candidates", ctx.stage.student,
             ctx.config["candidates"][best], chosen["heldout_loss"], len(table))
    return summary, 0


def _candidate_row(ctx: StageContext, index: int) -> dict:
    pruned, trained = ctx.inputs[f"pruned-{index}"].summary, ctx.inputs[f"trained-{index}"]
    ranked = ctx.inputs[f"ranked-{index}"].summary["perplexity"]
    return {"tag": ctx.config["candidates"][index], "shape": pruned["shape"], "params": pruned["params"],
            "layers_kept": pruned["layers_kept"], "tokens": trained.tokens,
            "train_loss": trained.summary.get("final_loss"), "heldout_loss": ranked["nll"],
            "heldout_tokens": ranked["tokens"], "model_dir": trained.summary["model_dir"]}


def evaluate_stage(ctx: StageContext) -> StageResult:
    from builder.acquire import load_blocks
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


def throughput_stage(ctx: StageContext) -> StageResult:
    from evaluators.throughput import ThroughputSettings, measure_throughput

    section = ctx.spec.throughput
    settings = ThroughputSettings(input_len=section.input_len, output_len=section.output_len,
                                  num_prompts=section.num_prompts, dtype=section.dtype,
                                  engine_args=dict(section.engine_args))
    models = {name: Path(manifest.summary["model_dir"]) for name, manifest in ctx.inputs.items()}
    results = measure_throughput(models, settings, ctx.out_dir)
    return {"results": results}, 0


# Each stage's code version, part of its hash (builder.store.StageKey), so a change to one
# stage recomputes that stage and, through the upstream hashes, what depends on it: never
# its upstream or its siblings (a new evaluation keeps every distilled student).
# BUMP RULE: bump a stage's version (any new string) in the commit that changes what it
# writes for the same inputs: its outputs' values, files, or the meaning of its summary,
# including through code it calls (builder.training for correct/distill, evaluators/ for
# evaluate/throughput; a change to shared code bumps every stage whose output changes).
# Refactors, speed-ups and logging need no bump. Hand-kept versions rather than a hash of
# each stage's source: the code a stage runs spans modules shared by several stages, so a
# source hash would either miss a change to a callee or recompute every stage for a comment.
STAGE_VERSIONS: dict[str, str] = {
    "acquire-teacher": "1",
    "acquire-data": "2",  # sharded .npy token blocks (builder.tokens)
    "correct": "1",
    "score": "1",
    "teach": "2",  # 2: draws from the tail (teacher_signal format 2)
    "prune": "1",
    "distill": "1",
    "select": "1",
    "evaluate": "2",  # perplexity's nll_stderr
    "throughput": "2",  # several timed passes: mean, spread, machine load
}

STAGE_FUNCTIONS: dict[str, Callable[[StageContext], StageResult]] = {
    "acquire-teacher": acquire_teacher_stage,
    "acquire-data": acquire_data_stage,
    "correct": correct_stage,
    "score": score_stage,
    "teach": teach_stage,
    "prune": prune_stage,
    "distill": distill_stage,
    "select": select_stage,
    "evaluate": evaluate_stage,
    "throughput": throughput_stage,
}
