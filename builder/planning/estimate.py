"""Before the GPU-hours: compute, time and per-GPU memory of every stage of a plan.

    estimate = estimate_plan(plan, teacher_config, RunOptions(gpu="h100", mfu=0.4, train_workers=8))
    print("\n".join(render_estimate(estimate)))

Each stage kind's descriptor (builder.stages) says what work a stage does (`StageKind.estimate`,
a `Work` in builder.planning.cost_model's units); this module adds the start-up, reading,
compute and writing into each stage's wall time and GPU-hours, and the memory per GPU of the
training stages, and prints them. The model, its constants and their sources:
builder.planning.cost_model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from builder.models.arch import student_config
from builder.models.variants import fp8_serving, gguf_fallbacks
from builder.options.run_options import RunOptions
from builder.planning.cost_model import (ACCELERATORS, COSTS, GIB, LM_EVAL_TASKS, MEMORY_HEADROOM, UNKNOWN_TASK,
                                         Accelerator, Costs, StageInputs, Work)
from builder.planning.dag import Plan
from builder.stages.registry import stage_kind
from builder.units import format_bytes, format_count
from builder.spec.batching import batch_layout
from builder.spec.shape import Shape

@dataclass
class StageEstimate:
    stage: str  # the stage id
    name: str
    label: str  # the stage's label: its student, model or search candidate ("" for the teacher's)
    tokens: int
    flops: float
    gpus: int
    gpu_hours: float
    wall_hours: float
    seconds: dict[str, float] = field(default_factory=dict)  # start, read, compute, write
    read_bytes: float = 0.0  # by all its workers together
    write_bytes: float = 0.0
    checkpoints: int = 0  # training checkpoints written
    # parallel -> TrainingMemory as a dict, + fits; or "forward" -> ForwardMemory as a dict (evaluations)
    memory: dict[str, dict] = field(default_factory=dict)
    micro_batch: int | None = None
    advice: str | None = None
    disk_peak: float = 0.0  # bytes its folder holds at once while it runs (cost_model.Disk)
    disk_kept: float = 0.0  # ... once it finished


@dataclass
class FamilyEstimate:
    accelerator: str
    bf16_tflops: float
    memory_gib: float
    mfu: float
    train_workers: int
    parallel: str
    stages: list[StageEstimate]
    notes: list[str]
    costs: dict = field(default_factory=dict)  # the Costs the wall times assume
    fit: Fit | None = None  # flags with which every training stage fits (fitting_flags)
    has_training: bool = False  # any stage that trains (a memory estimate)
    activation_checkpointing: bool = False  # --activation-checkpointing: in every memory total

    @property
    def gpu_hours(self) -> float:
        return sum(stage.gpu_hours for stage in self.stages)

    @property
    def serial_wall_hours(self) -> float:
        return sum(stage.wall_hours for stage in self.stages)

    @property
    def disk_peak(self) -> float:
        """The most the family holds on disk at once: at most every stage at its peak together
        (students side by side each write their second checkpoint at the same moment)."""
        return sum(stage.disk_peak for stage in self.stages)

    @property
    def disk_kept(self) -> float:
        return sum(stage.disk_kept for stage in self.stages)

    def disk_peaks(self) -> dict[str, float]:
        """Stage id -> its folder's peak bytes: what each stage checks is free before it writes."""
        return {stage.stage: stage.disk_peak for stage in self.stages}

    def to_json(self) -> dict:
        return asdict(self) | {"gpu_hours": self.gpu_hours, "serial_wall_hours": self.serial_wall_hours,
                               "disk_peak": self.disk_peak, "disk_kept": self.disk_kept}


def estimate_plan(plan: Plan, teacher_config, options: RunOptions, accelerator: Accelerator | None = None,
                  costs: Costs | None = None) -> FamilyEstimate:
    """`accelerator`, `costs`: others than `options.gpu`'s and the stated ones (bench.estimate
    uses this CPU's measured peak)."""
    accelerator = accelerator or ACCELERATORS[options.gpu]
    costs = (costs or COSTS).with_options(options)
    models = _model_configs(plan, teacher_config)
    training: list[tuple[object, object]] = []  # (stage, its memory_of): what fitting_flags checks
    stages = [_stage_estimate(plan, stage_id, models, teacher_config, options, accelerator, costs, training)
              for stage_id in plan.stages]
    notes = [f"MFU {options.mfu:.0%} of the {accelerator.name}'s {accelerator.bf16_tflops:g} TFLOP/s bf16 peak "
             "(assumed; --mfu overrides)", *costs.notes(), *_task_notes(plan),
             f"an evaluate or teach stage's memory: its model in {forward_dtype(plan, options)} and one batch's forward "
             "(one layer's tensors; perplexity's LM head in chunks, lm-eval's and teach's whole batch of logits, "
             "teach's top-k chunks); score's in float32, its hooks' copies or its LM-loss pass's logits",
             "wall time is per stage on its GPUs; the family's is at most their sum (students run side by side "
             "when the cluster has room)"]
    notes += [f"{student.spec.name}: estimated at its search's first candidate's shape" for student in plan.students
              if student.searched]
    notes += _variant_notes(plan, options, models)
    if plan.spec.data.max_tokens is None:
        notes.append("disk: acquire-data's token blocks are not counted (2 or 4 bytes per token of the corpus, whose "
                     "size is known only once tokenized; data.max_tokens bounds it)")
    return FamilyEstimate(accelerator.name, accelerator.bf16_tflops, accelerator.memory_gib, options.mfu,
                          options.train_workers, options.parallel, stages, notes, asdict(costs),
                          fitting_flags(training, options, accelerator) if training else None, bool(training),
                          options.activation_checkpointing)


def _variant_notes(plan: Plan, options: RunOptions, models: dict) -> list[str]:
    """The variants' sizes are estimated, and fp8 may build where vLLM serves it slowly."""
    schemes = [variant.scheme for variant in plan.spec.variants]
    gguf = [variant.scheme for variant in plan.spec.variants if variant.is_gguf]
    notes = ["a quantize stage's disk: its Linear weights at the scheme's bits with their scales, the rest in the "
             "teacher's dtype (builder.models.variants.variant_bytes)"] * (len(gguf) < len(schemes))
    if gguf:
        notes.append("a gguf stage's disk: the GGUF file at the types llama-quantize picks per tensor; its peak adds "
                     "the f16 GGUF it quantizes (builder.models.variants.gguf_bytes)")
    notes += _fallback_notes(plan, models)
    return notes + ([f"fp8-dynamic variants: {fp8_serving(options.use_gpu)}"] if "fp8-dynamic" in schemes else [])


def _fallback_notes(plan: Plan, models: dict) -> list[str]:
    """The models whose widths Q4_K_M's 256-weight super-blocks do not divide: accepted, as llama.cpp
    does (those tensors become Q5_0/Q8_0), and said before the build."""
    notes = []
    for variant in plan.spec.variants:
        for model in sorted({model for model, scheme in plan.variant_stages if scheme == variant.scheme}):
            odd = gguf_fallbacks(variant, Shape.of(models[model]))
            if odd:
                listed = ", ".join(f"{name}={width}" for name, width in odd.items())
                notes.append(f"{model}.{variant.scheme}: {listed} is no multiple of 256, so llama-quantize stores the "
                             "tensors reading it as Q5_0 (Q8_0 where Q4_K_M takes Q6_K): a larger file, counted in its "
                             "disk; the stage records the file's tensor types")
    return notes


def _task_notes(plan: Plan) -> list[str]:
    names = [task.name for task in plan.spec.evaluation.tasks]
    unknown = [name for name in names if name not in LM_EVAL_TASKS]
    notes = ["lm-eval tokens: documents x requests x tokens per task (builder.planning.cost_model.LM_EVAL_TASKS); "
             "generated tokens (gsm8k) are counted at the same MFU, which decoding does not reach"] if names else []
    if unknown:
        notes.append(f"{', '.join(unknown)}: not in the task table, estimated as {UNKNOWN_TASK.docs} documents of "
                     f"{UNKNOWN_TASK.requests:g} requests of {UNKNOWN_TASK.tokens:g} tokens")
    return notes


def _model_configs(plan: Plan, teacher_config) -> dict[str, object]:
    """Model name or candidate label -> its config (a searched student: its first candidate)."""
    configs = {"teacher": teacher_config, "teacher-original": teacher_config}
    for student in plan.students:
        shape = student.shape or student.candidates[0].shape
        configs[student.spec.name] = student_config(teacher_config, shape)
        for candidate in student.candidates:
            configs[f"{student.spec.name}.{candidate.tag}"] = student_config(teacher_config, candidate.shape)
    return configs


def _stage_estimate(plan: Plan, stage_id: str, models: dict, teacher_config, options: RunOptions,
                    accelerator: Accelerator, costs: Costs, training: list) -> StageEstimate:
    stage = plan.stages[stage_id]
    producers = {role: plan.stages[stage_id].name for role, stage_id in stage.inputs.items()}
    teacher = models[plan.taught_by(stage_id)] if "teacher" in stage.inputs else teacher_config  # a parent's: chained
    inputs = StageInputs(stage.key.label, producers, models, teacher)
    kind = stage_kind(stage.name)
    work = kind.estimate(stage.key.config, stage.key.execution, inputs, costs, plan.spec.data.seq_len) \
        if kind.estimate else Work()  # select: file work only
    workers = options.train_workers if kind.uses_workers else 1
    gpus = workers if kind.resources != "light" else 0
    seconds = stage_seconds(work, workers, accelerator, options.mfu, costs)
    wall_hours = sum(seconds.values()) / 3600
    estimate = StageEstimate(stage_id, stage.name, stage.key.label, work.tokens, work.flops, gpus, gpus * wall_hours,
                             wall_hours, seconds, work.read_bytes * workers + work.split_read_bytes, work.write_bytes,
                             work.checkpoints, disk_peak=work.disk.peak, disk_kept=work.disk.kept)
    if work.memory_of is not None and work.tokens:
        _add_memory(estimate, work.memory_of, _micro_batch(stage, options), options, accelerator)
        training.append((stage, work.memory_of))
    if work.forward_memory_of is not None:
        forward = work.forward_memory_of(forward_dtype(plan, options))  # score's own: float32 whatever this says
        estimate.memory["forward"] = asdict(forward) | {
            "total": forward.total, "fits": forward.total <= accelerator.memory_gib * GIB * MEMORY_HEADROOM}
    return estimate


def forward_dtype(plan: Plan, options: RunOptions) -> str:
    """The precision teach and evaluate hold their model in on a GPU: the plan's (their keys
    hash it) when the build runs on GPUs, for which it was resolved; bf16 for a plan resolved
    for this CPU (as the training stages' memory assumes on GPUs)."""
    return plan.precision.dtype if options.use_gpu else "bfloat16"


def stage_seconds(work: Work, workers: int, accelerator: Accelerator, mfu: float, costs: Costs) -> dict[str, float]:
    """Wall seconds of each part of a stage: its workers start, read and compute side by side."""
    return {"start": work.start_s, "read": (work.read_bytes + work.split_read_bytes / workers) / (costs.read_gbps * 1e9),
            "compute": work.flops / (workers * accelerator.bf16_tflops * 1e12 * mfu),
            "write": work.write_bytes / (costs.write_gbps * 1e9)}


def _micro_batch(stage, options: RunOptions) -> int:
    """The per-worker micro-batch a build would run (builder.spec.batching splits the spec's global
    batch over --train-workers, capped by the execution-only micro_batch_size)."""
    config, execution = stage.key.config, stage.key.execution
    return batch_layout(config["global_batch_size"], options.train_workers,
                        execution.get("micro_batch_size", config["global_batch_size"])).micro_batch_size


def _add_memory(estimate: StageEstimate, memory_of, micro_batch: int, options: RunOptions,
                accelerator: Accelerator) -> None:
    budget = accelerator.memory_gib * GIB * MEMORY_HEADROOM
    for parallel in ("ddp", "fsdp"):
        memory = _memory(memory_of, micro_batch, options.train_workers, parallel, options.activation_checkpointing,
                         accelerator)
        estimate.memory[parallel] = asdict(memory) | {"total": memory.total, "total_checkpointed":
                                                      memory.total_checkpointed, "fits": memory.total <= budget}
    estimate.micro_batch = micro_batch
    estimate.advice = fit_advice(memory_of, micro_batch, options, accelerator)


def _memory(memory_of, micro_batch: int, workers: int, parallel: str, checkpointing: bool,
            accelerator: Accelerator):
    """A training stage's memory per GPU on `accelerator`: bf16, as it trains on GPUs."""
    return memory_of(micro_batch, workers, parallel, checkpointing=checkpointing, dtype="bfloat16",
                     device_bytes=accelerator.memory_gib * GIB)


def fit_advice(memory_of, micro_batch: int, options: RunOptions, accelerator: Accelerator) -> str:
    """'fits on 80 GB ...' or 'does not fit on 80 GB ...; try --parallel fsdp --activation-checkpointing ...':
    per parallelism and checkpointing (the chosen ones first), the largest micro-batch that fits."""
    budget = accelerator.memory_gib * GIB * MEMORY_HEADROOM
    workers, chosen_ckpt = options.train_workers, options.activation_checkpointing
    chosen = _memory(memory_of, micro_batch, workers, options.parallel, chosen_ckpt, accelerator)
    how = options.parallel + (", activation checkpointing" if chosen_ckpt else "")
    where = f"{accelerator.memory_gib:g} GB ({_gib(chosen.total)} per GPU with {how})"
    if chosen.total <= budget:
        return f"fits on {where}"
    tries = []
    for parallel in dict.fromkeys([options.parallel, "fsdp"]):
        for checkpointing in dict.fromkeys([chosen_ckpt, True]):
            fitting = [b for b in range(micro_batch, 0, -1)
                       if _memory(memory_of, b, workers, parallel, checkpointing, accelerator).total <= budget]
            if fitting:
                tries.append(_change(parallel, checkpointing, fitting[0], options, micro_batch))
    if not tries:
        tries.append("more --train-workers with --parallel fsdp --activation-checkpointing, or a GPU with more memory")
    return f"does not fit on {where}; try " + ", or ".join(tries)


def _change(parallel: str, checkpointing: bool, batch: int, options: RunOptions, chosen_batch: int) -> str:
    parts = [f"--parallel {parallel}"] if parallel != options.parallel else []
    if checkpointing and not options.activation_checkpointing:
        parts.append("--activation-checkpointing")
    flags = " ".join(parts)
    if batch != chosen_batch:
        flags = " with ".join(filter(None, [flags, f"micro_batch_size {batch} (accumulation keeps the global batch)"]))
    return flags


# What --dry-run tries, in order, for a flag combination that fits every training stage: the
# fewest workers first (GPU-hours follow the compute, but a smaller group wastes less on
# start-up and communication), then DDP before FSDP (no all-gathers) and no checkpointing
# before checkpointing (which recomputes each layer's forward, about a third more compute).
WORKER_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
LAYOUTS = (("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True))


@dataclass
class Fit:
    """A flag combination with which every training stage fits on the accelerator."""

    train_workers: int
    parallel: str
    activation_checkpointing: bool
    peak: float  # the largest stage's bytes per GPU

    @property
    def flags(self) -> str:
        return (f"--train-workers {self.train_workers} --parallel {self.parallel}"
                + " --activation-checkpointing" * self.activation_checkpointing)


def fitting_flags(training: list[tuple[object, object]], options: RunOptions, accelerator: Accelerator) -> Fit | None:
    """The first (WORKER_COUNTS x LAYOUTS) combination, from --train-workers up, with which every
    training stage (stage, its memory_of) fits, at the micro-batch the spec gives it with that
    many workers; None when none does."""
    budget = accelerator.memory_gib * GIB * MEMORY_HEADROOM
    for workers in [w for w in WORKER_COUNTS if w >= options.train_workers]:
        if any(stage.key.config["global_batch_size"] % workers for stage, _ in training):
            continue  # the workers must divide every global batch (builder.spec.batching)
        layout = options.model_copy(update={"train_workers": workers})
        for parallel, checkpointing in LAYOUTS:
            peak = max(_memory(memory_of, _micro_batch(stage, layout), workers, parallel, checkpointing,
                               accelerator).total for stage, memory_of in training)
            if peak <= budget:
                return Fit(workers, parallel, checkpointing, peak)
    return None


def render_fit(estimate: "FamilyEstimate") -> list[str]:
    fit, budget = estimate.fit, estimate.memory_gib * GIB * MEMORY_HEADROOM
    if not estimate.has_training:
        return []
    if fit is None:
        return [f"  fits on {estimate.memory_gib:g} GB: no combination of up to {WORKER_COUNTS[-1]} workers, "
                "--parallel and --activation-checkpointing; lower micro_batch_size in the spec or use a GPU with "
                "more memory"]
    return [f"  fits on {estimate.memory_gib:g} GB: {fit.flags} (every training stage at most {_gib(fit.peak)} "
            f"per GPU of the {_gib(budget)} the estimate allows; micro-batches as the spec splits them)"]


def _gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB"


def render_estimate(estimate: FamilyEstimate) -> list[str]:
    lines = [f"Estimate on {estimate.accelerator} at {estimate.mfu:.0%} MFU, {estimate.train_workers} training "
             f"GPU(s) per training stage ({estimate.parallel}):"]
    header = ["stage", "tokens", "FLOPs", "GPUs", "GPU-hours", "wall", "of which start + I/O",
              "memory per GPU (ddp+ckpt / fsdp+ckpt / fsdp+ckpt)" if estimate.activation_checkpointing
              else "memory per GPU (ddp / fsdp / fsdp+ckpt)"]
    lines += _table(header, [_row(stage) for stage in estimate.stages if stage.wall_hours])
    lines += [f"  family: {estimate.gpu_hours:,.1f} GPU-hours, at most {_hours(estimate.serial_wall_hours)} of "
              "wall time"]
    lines += [f"  {stage.stage}: {stage.advice}" for stage in estimate.stages if stage.advice]
    lines += render_fit(estimate)
    lines += [f"  note: {note}" for note in estimate.notes]
    return lines + render_disk(estimate)


def render_disk(estimate: FamilyEstimate) -> list[str]:
    """Each stage's folder at its peak and once finished, and the family's."""
    rows = [[stage.stage, format_bytes(stage.disk_peak), format_bytes(stage.disk_kept)]
            for stage in estimate.stages if stage.disk_peak]
    lines = ["", "Disk, each stage's folder (peak: at once while it runs; kept: once finished; logs and small "
                 "results aside):", *_table(["stage", "peak", "kept"], rows)]
    return lines + [f"  family: {format_bytes(estimate.disk_kept)} once built, at most {format_bytes(estimate.disk_peak)} "
                    "at once while it builds (every stage at its peak together)"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *rows]]


def _row(stage: StageEstimate) -> list[str]:
    memory = "-"
    if "forward" in stage.memory:
        memory = _gib(stage.memory["forward"]["total"])
    elif stage.memory:
        ddp, fsdp = stage.memory["ddp"], stage.memory["fsdp"]
        memory = f"{_gib(ddp['total'])} / {_gib(fsdp['total'])} / {_gib(fsdp['total_checkpointed'])}"
    fixed = stage.wall_hours - stage.seconds.get("compute", 0.0) / 3600
    return [stage.stage, format_count(stage.tokens), f"{stage.flops:.2e}", str(stage.gpus),
            f"{stage.gpu_hours:,.2f}", _hours(stage.wall_hours), _fixed(fixed, stage.checkpoints), memory]


def _fixed(hours: float, checkpoints: int) -> str:
    return _hours(hours) + (f" ({checkpoints} checkpoint{'s' * (checkpoints > 1)})" if checkpoints else "")


def _hours(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} d"
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"
