"""Before the GPU-hours: compute, time and per-GPU memory of every stage of a plan.

    estimate = estimate_plan(plan, teacher_config, RunOptions(gpu="h100", mfu=0.4, train_workers=8))
    print("\n".join(render_estimate(estimate)))

FLOPs are analytic (PaLM appendix B: matmuls only, 2 per multiply-add, attention over the full
sequence): a forward pass costs `forward_flops_per_token` per token, a training step three
forwards' worth for the trained model (forward + backward), and distillation adds the frozen
teacher's forward. Time is FLOPs / (GPUs x bf16 peak x MFU); the MFU is an assumption, printed
with every estimate and overridable (`--mfu`). lm-eval's own tokens depend on the task files
and are not counted (its stages show only their held-out perplexity tokens).

Memory per GPU of a training stage, for DDP and for FSDP (student state sharded, frozen
teacher replicated, as builder.distill does): fp32 master weights, fp32 gradients and AdamW's
two fp32 moments (16 bytes per trained parameter), the frozen teacher in the training dtype,
activations of one micro-batch (bf16, the tensors autograd keeps per layer, counted below)
and the logits (student in bf16, its fp32 gradient buffer, the teacher's in bf16: builder.distill
materialises full logits and chunks only the loss). Activation checkpointing (keeping only each
layer's input) is shown for comparison: minizoo does not implement it yet.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from builder.arch import count_params, student_config
from builder.options import RunOptions
from builder.plan import Plan
from builder.shape import Shape
from builder.units import format_count

GIB = 2**30
MEMORY_HEADROOM = 0.9  # CUDA context, allocator fragmentation and NCCL buffers take the rest


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak, from the vendor's data sheet
    memory_gib: float


ACCELERATORS = {
    "h100": Accelerator("NVIDIA H100 SXM 80GB", 989.0, 80),
    "h200": Accelerator("NVIDIA H200 SXM 141GB", 989.0, 141),
    "a100": Accelerator("NVIDIA A100 SXM 80GB", 312.0, 80),
    "l40s": Accelerator("NVIDIA L40S 48GB", 362.0, 48),
}
DEFAULT_MFU = 0.4  # what well-tuned dense training reaches on H100s; inference stages reach less


# --- FLOPs ------------------------------------------------------------------------------


def forward_flops_per_token(config, seq_len: int) -> int:
    """Matmul FLOPs of one forward pass per token, LM head and attention included."""
    shape = Shape.of(config)
    h, d, layers = shape.hidden_size, shape.head_dim, shape.num_hidden_layers
    q_width, kv_width = shape.num_attention_heads * d, shape.num_key_value_heads * d
    layer_params = h * q_width + 2 * h * kv_width + q_width * h + 3 * h * shape.intermediate_size
    lm_head = h * config.vocab_size
    attention = 4 * layers * q_width * seq_len  # Q K^T and scores x V, 2 FLOPs per multiply-add
    return 2 * (layers * layer_params + lm_head) + attention


def kd_flops_per_token(teacher_config, student_config, seq_len: int) -> dict:
    teacher = forward_flops_per_token(teacher_config, seq_len)
    student = forward_flops_per_token(student_config, seq_len)
    return {"teacher_forward": teacher, "student_forward": student, "total": teacher + 3 * student}


# --- memory -----------------------------------------------------------------------------


def activation_bytes_per_token_layer(config) -> int:
    """bf16 tensors autograd keeps per token in one decoder layer: the two norms' inputs (fp32
    residual), the normed inputs of attention and MLP, q/k/v, the attention output, and the
    MLP's gate, up and gated product (SDPA/flash attention keeps no seq x seq scores)."""
    shape = Shape.of(config)
    q_width, kv_width = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    bf16 = 2 * (2 * shape.hidden_size + q_width + 2 * kv_width + q_width + 3 * shape.intermediate_size)
    return bf16 + 2 * 4 * shape.hidden_size


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per GPU of one training stage under one parallelism."""

    parallel: str
    weights: float
    gradients: float
    optimizer: float
    teacher: float
    activations: float
    activations_checkpointed: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.teacher + self.activations + self.logits

    @property
    def total_checkpointed(self) -> float:
        return self.total - self.activations + self.activations_checkpointed


def training_memory(trained_config, frozen_config, micro_batch: int, seq_len: int, workers: int,
                    parallel: str) -> TrainingMemory:
    """`frozen_config` None: teacher correction (the teacher itself trains, no frozen model)."""
    trained = count_params(trained_config)
    shard = workers if parallel == "fsdp" else 1
    tokens = micro_batch * seq_len
    layers = Shape.of(trained_config).num_hidden_layers
    per_layer = activation_bytes_per_token_layer(trained_config) * tokens
    logits_per_token = (2 + 4 + (2 if frozen_config is not None else 0)) * trained_config.vocab_size
    return TrainingMemory(
        parallel=parallel, weights=4 * trained / shard, gradients=4 * trained / shard, optimizer=8 * trained / shard,
        teacher=2 * count_params(frozen_config) if frozen_config is not None else 0.0,
        activations=layers * per_layer,
        activations_checkpointed=layers * 2 * Shape.of(trained_config).hidden_size * tokens + per_layer,
        logits=logits_per_token * tokens)


# --- stages -----------------------------------------------------------------------------


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
    memory: dict[str, dict] = field(default_factory=dict)  # parallel -> TrainingMemory as a dict, + fits
    micro_batch: int | None = None
    advice: str | None = None


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

    @property
    def gpu_hours(self) -> float:
        return sum(stage.gpu_hours for stage in self.stages)

    @property
    def serial_wall_hours(self) -> float:
        return sum(stage.wall_hours for stage in self.stages)

    def to_json(self) -> dict:
        return asdict(self) | {"gpu_hours": self.gpu_hours, "serial_wall_hours": self.serial_wall_hours}


def estimate_plan(plan: Plan, teacher_config, options: RunOptions,
                  accelerator: Accelerator | None = None) -> FamilyEstimate:
    """`accelerator`: another than `options.gpu`'s (bench.estimate uses this CPU's measured peak)."""
    accelerator = accelerator or ACCELERATORS[options.gpu]
    models = _model_configs(plan, teacher_config)
    stages = [_stage_estimate(plan, stage_id, models, teacher_config, options, accelerator)
              for stage_id in plan.stages]
    notes = [f"MFU {options.mfu:.0%} of the {accelerator.name}'s {accelerator.bf16_tflops:g} TFLOP/s bf16 peak "
             "(assumed; --mfu overrides)",
             "lm-eval's own tokens are not counted; evaluation shows its held-out perplexity tokens only",
             "wall time is per stage on its GPUs; the family's is at most their sum (students run side by side "
             "when the cluster has room)"]
    notes += [f"{student.spec.name}: estimated at its search's first candidate's shape" for student in plan.students
              if student.searched]
    return FamilyEstimate(accelerator.name, accelerator.bf16_tflops, accelerator.memory_gib, options.mfu,
                          options.train_workers, options.parallel, stages, notes)


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
                    accelerator: Accelerator) -> StageEstimate:
    stage = plan.stages[stage_id]
    config, seq_len = stage.key.config, plan.spec.data.seq_len
    model = models.get(stage.key.label or "teacher", teacher_config)
    tokens, flops, memory_of = _work(stage.name, config, model, teacher_config, seq_len,
                                     [models[role] for role in stage.inputs if role in models])
    gpus = options.train_workers if stage.name in ("distill", "correct") else 1
    gpu_hours = flops / (accelerator.bf16_tflops * 1e12 * options.mfu) / 3600
    estimate = StageEstimate(stage_id, stage.name, stage.key.label, tokens, flops, gpus if flops else 0, gpu_hours,
                             gpu_hours / gpus)
    if memory_of is not None and tokens:
        _add_memory(estimate, memory_of, _micro_batch(stage, options), options, accelerator)
    return estimate


def _micro_batch(stage, options: RunOptions) -> int:
    """The per-worker micro-batch a build would run (builder.batching splits the spec's global
    batch over --train-workers, capped by the execution-only micro_batch_size)."""
    from builder.batching import batch_layout

    config, execution = stage.key.config, stage.key.execution
    return batch_layout(config["global_batch_size"], options.train_workers,
                        execution.get("micro_batch_size", config["global_batch_size"])).micro_batch_size


def _work(name: str, config: dict, model, teacher_config, seq_len: int, measured: list):
    """(tokens, FLOPs, memory function of (micro_batch, workers, parallel) or None) of one stage;
    `measured`: the configs of the models a throughput stage runs."""
    teacher_forward = forward_flops_per_token(teacher_config, seq_len)
    if name == "correct":
        tokens = config["tokens"]
        return tokens, 3 * teacher_forward * tokens, _memory_of(teacher_config, None, seq_len)
    if name == "distill":  # from a stored signal (teacher_signal: topk) without the teacher's forward
        tokens, stored = config["tokens"], config.get("teacher_signal") == "topk"
        flops = kd_flops_per_token(teacher_config, model, seq_len)["total"] - (teacher_forward if stored else 0)
        return tokens, flops * tokens, _memory_of(model, None if stored else teacher_config, seq_len)
    if name == "teach":  # the teacher's forward pass, once, over every position a student reads
        tokens = config["positions"] * seq_len
        return tokens, teacher_forward * tokens, None
    if name == "score":
        tokens = (config["samples"] + config["lm_loss_samples"] * Shape.of(teacher_config).num_hidden_layers) * seq_len
        return tokens, teacher_forward * tokens, None
    if name == "evaluate":
        tokens = config["perplexity_tokens"]
        return tokens, forward_flops_per_token(model, seq_len) * tokens, None
    if name == "throughput":
        length = config["input_len"] + config["output_len"]
        per_model = config["num_prompts"] * length
        return per_model * len(measured), sum(per_model * forward_flops_per_token(m, length) for m in measured), None
    return 0, 0.0, None  # acquire, prune, select: reading and writing files


def _memory_of(trained, frozen, seq_len: int):
    return lambda micro_batch, workers, parallel: training_memory(trained, frozen, micro_batch, seq_len, workers,
                                                                  parallel)


def _add_memory(estimate: StageEstimate, memory_of, micro_batch: int, options: RunOptions,
                accelerator: Accelerator) -> None:
    budget = accelerator.memory_gib * GIB * MEMORY_HEADROOM
    for parallel in ("ddp", "fsdp"):
        memory = memory_of(micro_batch, options.train_workers, parallel)
        estimate.memory[parallel] = asdict(memory) | {"total": memory.total, "total_checkpointed":
                                                      memory.total_checkpointed, "fits": memory.total <= budget}
    estimate.micro_batch = micro_batch
    estimate.advice = fit_advice(memory_of, micro_batch, options, accelerator)


def fit_advice(memory_of, micro_batch: int, options: RunOptions, accelerator: Accelerator) -> str:
    """'fits on 80 GB ...' or 'does not fit on 80 GB ...; try --parallel fsdp with micro_batch_size 1 ...':
    the first change that fits, per parallelism (the chosen one first), largest micro-batch first."""
    budget = accelerator.memory_gib * GIB * MEMORY_HEADROOM
    chosen = memory_of(micro_batch, options.train_workers, options.parallel)
    where = f"{accelerator.memory_gib:g} GB ({_gib(chosen.total)} per GPU with {options.parallel})"
    if chosen.total <= budget:
        return f"fits on {where}"
    tries = []
    for parallel in dict.fromkeys([options.parallel, "fsdp"]):
        fitting = [b for b in range(micro_batch, 0, -1)
                   if memory_of(b, options.train_workers, parallel).total <= budget]
        if fitting:
            tries.append(_change(parallel, fitting[0], options.parallel, micro_batch))
    if not tries:
        tries.append("more --train-workers with --parallel fsdp, a GPU with more memory, or activation "
                     f"checkpointing (not in minizoo yet: {_gib(chosen.total_checkpointed)})")
    return f"does not fit on {where}; try " + ", or ".join(tries)


def _change(parallel: str, batch: int, chosen_parallel: str, chosen_batch: int) -> str:
    parts = [f"--parallel {parallel}"] if parallel != chosen_parallel else []
    if batch != chosen_batch:
        parts.append(f"micro_batch_size {batch} (accumulation keeps the global batch)")
    return " with ".join(parts)


def _gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB"


# --- output -----------------------------------------------------------------------------


def render_estimate(estimate: FamilyEstimate) -> list[str]:
    lines = [f"Estimate on {estimate.accelerator} at {estimate.mfu:.0%} MFU, {estimate.train_workers} training "
             f"GPU(s) per training stage ({estimate.parallel}):"]
    header = ["stage", "tokens", "FLOPs", "GPUs", "GPU-hours", "wall", "memory per GPU (ddp / fsdp / fsdp+ckpt)"]
    rows = [_row(stage) for stage in estimate.stages if stage.flops]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in [header, *rows]]
    lines += [f"  family: {estimate.gpu_hours:,.1f} GPU-hours, at most {_hours(estimate.serial_wall_hours)} of "
              "wall time"]
    lines += [f"  {stage.stage}: {stage.advice}" for stage in estimate.stages if stage.advice]
    lines += [f"  note: {note}" for note in estimate.notes]
    return lines


def _row(stage: StageEstimate) -> list[str]:
    memory = "-"
    if stage.memory:
        ddp, fsdp = stage.memory["ddp"], stage.memory["fsdp"]
        memory = f"{_gib(ddp['total'])} / {_gib(fsdp['total'])} / {_gib(fsdp['total_checkpointed'])}"
    return [stage.stage, format_count(stage.tokens), f"{stage.flops:.2e}", str(stage.gpus),
            f"{stage.gpu_hours:,.2f}", _hours(stage.wall_hours), memory]


def _hours(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} d"
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


