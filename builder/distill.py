"""Knowledge distillation and teacher correction: one training loop, pure torch.

    distill(teacher_dir, student_dir, blocks, out_dir, TrainSettings(tokens=10_000_000))
    correct_teacher(teacher_dir, blocks, out_dir, TrainSettings(tokens=..., loss="cross_entropy"))

The same loop runs in one process, or under torch.distributed (DDP, or FSDP2 when asked)
when a process group is initialized: torchrun, or Ray Train via `builder.ray_train`.
Rank 0 alone writes to `out_dir`, which must be on disk every rank can read:

    out_dir/checkpoints/step-000050/trainer_state.pt   resumable state (atomic: tmp dir + rename)
    out_dir/checkpoints/latest                         names the newest complete checkpoint
    out_dir/metrics.jsonl                              one JSON line per logged step
    out_dir/model/                                     final HF checkpoint + tokenizer files
    out_dir/result.json                                TrainResult, written last

A run started again on the same `out_dir` resumes from `latest` (losing at most one
checkpoint interval) and, because the data order, RNG states, optimizer and schedule are
all restored, ends with the same weights as a run that was never interrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from builder.prune import PRUNING_MAP, read_pruning_map

Loss = Literal["forward_kl", "reverse_kl", "jsd", "cross_entropy"]
Dtype = Literal["float32", "bfloat16"]
Parallel = Literal["ddp", "fsdp"]
LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "cross_entropy")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The loss sees logits [tokens, vocab]; with a 49152-wide vocab, 1024 tokens are 200 MB per
# fp32 copy. Chunks of this many tokens bound the loss's temporaries (log-softmaxes,
# probabilities) to a few chunk-sized copies; each chunk's gradient is taken right away
# (see _ChunkedLosses) instead of keeping its temporaries alive for backward.
LOSS_CHUNK_TOKENS = 256
BLOCKS_KEY = "input_ids"  # tensor name in a blocks .safetensors file with several tensors
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json",
    "chat_template.jinja",
)  # fmt: skip
STATE_FILE = "trainer_state.pt"
log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite, or the loss exploded (grew past
    EXPLODED_LOSS_FACTOR times its starting value); `step` says when."""

    def __init__(self, step: int, what: str, value: float, settings_hint: str = ""):
        self.step, self.what, self.value, self.settings_hint = step, what, value, settings_hint
        super().__init__(
            f"training diverged at step {step}: {what} is {value}; {settings_hint}".rstrip("; ")
        )

    def __reduce__(self):  # keeps the fields when Ray pickles it back to the driver
        return (type(self), (self.step, self.what, self.value, self.settings_hint))


@dataclass(frozen=True)
class TrainSettings:
    """How one training run goes. Field defaults mirror `builder.spec.TrainingSpec`."""

    tokens: int  # budget; steps = ceil(tokens / (batch_size * grad_accum * seq_len * world_size))
    batch_size: int = 4  # sequences per micro-batch per worker
    grad_accum: int = 1
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int | float = 10  # an int counts steps; a float in [0, 1) is a fraction of them
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    loss: Loss = "forward_kl"  # cross_entropy = plain LM fine-tuning (teacher correction)
    temperature: float = 1.0  # KD losses soften both distributions and scale by T^2
    lm_loss_weight: float = 0.0  # total = divergence + lm_loss_weight * next-token CE
    # + hidden_loss_weight * the intermediate-state loss (see HiddenStateAligner)
    hidden_loss_weight: float = 0.0
    checkpoint_every: int = 25  # steps
    seed: int = 0
    dtype: Dtype = "float32"  # bfloat16 = autocast (fp32 master weights and optimizer)
    activation_checkpointing: bool = False
    log_every: int = 1  # steps between metrics.jsonl lines

    def __post_init__(self) -> None:
        problems = [p for p in _settings_problems(self) if p]
        if problems:
            raise ValueError("invalid TrainSettings: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, spec: object, **overrides: object) -> "TrainSettings":
        """From a `builder.spec` TrainingSpec (pydantic) plus run options (dtype, ...)."""
        values = {name: value for name, value in spec.model_dump().items() if name in _FIELDS}
        return cls(**{**values, **overrides})

    def steps(self, seq_len: int, world_size: int) -> int:
        per_step = self.batch_size * self.grad_accum * seq_len * world_size
        return max(1, math.ceil(self.tokens / per_step))

    def warmup(self, total_steps: int) -> int:
        if isinstance(self.warmup_steps, float):
            return int(self.warmup_steps * total_steps)
        return self.warmup_steps


def _settings_problems(s: TrainSettings) -> list[str]:
    def need(ok: bool, name: str, rule: str) -> str:
        return "" if ok else f"{name}={getattr(s, name)!r} {rule}"

    warmup = s.warmup_steps
    return [
        need(s.tokens > 0, "tokens", "must be positive (the token budget, e.g. 10_000_000)"),
        need(s.batch_size > 0, "batch_size", "must be a positive number of sequences"),
        need(s.grad_accum > 0, "grad_accum", "must be a positive number of micro-batches"),
        need(0 < s.learning_rate < 1, "learning_rate", "must be in (0, 1), e.g. 1e-4"),
        need(0 <= s.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1], e.g. 0.1"),
        need(
            (isinstance(warmup, int) and warmup >= 0) or (isinstance(warmup, float) and 0 <= warmup < 1),
            "warmup_steps", "must be a step count >= 0 or a fraction in [0, 1) of the steps",
        ),
        need(s.weight_decay >= 0, "weight_decay", "must be >= 0"),
        need(s.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 turns clipping off)"),
        need(s.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}"),
        need(s.temperature > 0, "temperature", "must be positive (1 is the Minitron default)"),
        need(s.lm_loss_weight >= 0, "lm_loss_weight", "must be >= 0"),
        need(s.hidden_loss_weight >= 0, "hidden_loss_weight", "must be >= 0"),
        need(s.checkpoint_every > 0, "checkpoint_every", "must be a positive step count"),
        need(s.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"),
        need(s.log_every > 0, "log_every", "must be a positive step count"),
    ]


_FIELDS = {field.name for field in dataclasses.fields(TrainSettings)}


@dataclass(frozen=True)
class TrainResult:
    tokens_seen: int  # over the whole run, resumed parts included
    steps: int
    final_loss: float
    wall_seconds: float  # this invocation only
    tokens_per_second: float  # tokens trained by this invocation / its loop time
    start_step: int  # 0, or the checkpoint step this invocation resumed from
    model_dir: str


# ----------------------------------------------------------------------------------------
# Public entry points


def distill(
    teacher_dir: str | Path,
    student_dir: str | Path,
    train_blocks: torch.Tensor | str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    device: torch.device | None = None,
    parallel: Parallel = "ddp",
) -> TrainResult:
    """Train the student to match the frozen teacher's next-token distributions."""
    if settings.loss == "cross_entropy":
        raise ValueError(
            "settings.loss='cross_entropy' ignores the teacher; use forward_kl (the Minitron "
            "default), reverse_kl or jsd to distill, or correct_teacher() to fine-tune"
        )
    return train(student_dir, Path(teacher_dir), train_blocks, out_dir, settings, device, parallel)


def correct_teacher(
    teacher_dir: str | Path,
    train_blocks: torch.Tensor | str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    device: torch.device | None = None,
    parallel: Parallel = "ddp",
) -> TrainResult:
    """Fine-tune the teacher on the distillation data (next-token cross-entropy).

    Whatever `settings.loss` says, the loss is cross_entropy: there is no teacher to match.
    """
    settings = dataclasses.replace(settings, loss="cross_entropy", lm_loss_weight=0.0, hidden_loss_weight=0.0)
    return train(teacher_dir, None, train_blocks, out_dir, settings, device, parallel)


def load_blocks(path: str | Path) -> torch.Tensor:
    """Token blocks [N, seq_len] from a .safetensors file (its only tensor, or `input_ids`)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if len(tensors) != 1 and BLOCKS_KEY not in tensors:
        raise ValueError(
            f"{path} holds tensors {sorted(tensors)}; a blocks file needs a single tensor or "
            f"one named {BLOCKS_KEY!r}"
        )
    return tensors[BLOCKS_KEY] if BLOCKS_KEY in tensors else next(iter(tensors.values()))


def load_result(out_dir: str | Path) -> TrainResult:
    return TrainResult(**json.loads((Path(out_dir) / "result.json").read_text()))


# ----------------------------------------------------------------------------------------
# The training loop, top to bottom


def train(
    model_dir: str | Path,
    teacher_dir: Path | None,
    train_blocks: torch.Tensor | str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    device: torch.device | None = None,
    parallel: Parallel = "ddp",
) -> TrainResult:
    """Train the model in `model_dir` (against the teacher's logits when one is given)."""
    started = time.perf_counter()
    out_dir, world = Path(out_dir), World.current()
    device = device or default_device()
    if device.type == "cuda":  # NCCL collectives run on the current device
        torch.cuda.set_device(device)
    _warn_if_bf16_is_emulated(settings, device)
    blocks = _checked_blocks(train_blocks)
    total_steps = settings.steps(blocks.shape[1], world.size)
    tokens_per_step = settings.batch_size * settings.grad_accum * world.size * blocks.shape[1]

    # Same seed on every rank: every replica starts from identical weights (FSDP shards them).
    torch.manual_seed(settings.seed)
    student = load_model(model_dir, device, torch.float32, trainable=True, settings=settings)
    teacher = None
    if teacher_dir is not None:
        teacher = load_model(teacher_dir, device, DTYPES[settings.dtype], trainable=False)
        _check_same_vocab(teacher, student, teacher_dir, model_dir)
    _check_token_ids(blocks, student.config.vocab_size)
    if teacher is not None and settings.hidden_loss_weight > 0:
        student = HiddenStateAligner(student, teacher, read_pruning_map(model_dir)).to(device)
    model = wrap_for_distributed(student, device, world, parallel)
    optimizer = make_optimizer(model, settings)
    scheduler = warmup_cosine_schedule(optimizer, settings, total_steps)

    # What a checkpoint must agree with to be resumed: same steps over the same data.
    plan = {"total_steps": total_steps, "tokens_per_step": tokens_per_step, "seed": settings.seed}
    resumed = resume_from_checkpoint(out_dir, model, optimizer, scheduler, world, plan)
    start_step, last_loss = resumed.get("step", 0), resumed.get("loss", float("nan"))
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", enabled=world.is_main, keep_up_to=start_step)
    batches = BlockStream(blocks, settings, world)
    desc = "distill" if teacher is not None else "correct"
    progress_bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not world.is_main)
    loop_started = time.perf_counter()

    model.train()
    start_losses: list[float] = []  # the first LOSS_BASELINE_STEPS losses of this run (or since its resume)
    with progress_bar as progress:  # closed on errors too
        for step in range(start_step + 1, total_steps + 1):
            step_started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses = accumulate_gradients(model, teacher, batches, step, settings, device)
            losses = world.mean(losses)  # LOSS_PARTS, the same on all ranks
            grad_norm = clip_gradients(model, settings.max_grad_norm)
            last_checkpoint = max(start_step, (step - 1) // settings.checkpoint_every * settings.checkpoint_every)
            check_finite(step, losses[0].item(), grad_norm, settings, start_losses,
                         "distill" if teacher is not None else "correction", last_checkpoint)
            if len(start_losses) < LOSS_BASELINE_STEPS:
                start_losses.append(losses[0].item())
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            optimizer.step()
            scheduler.step()

            last_loss, seconds = losses[0].item(), time.perf_counter() - step_started
            if step % settings.log_every == 0 or step == total_steps:
                record = _step_metrics(step, losses, lr, grad_norm, tokens_per_step, seconds, settings)
                metrics_log.write(record)
            progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_per_step / seconds:.0f}")
            progress.update(1)
            if step % settings.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(out_dir, model, optimizer, scheduler, world, plan, step, last_loss)
    loop_seconds = time.perf_counter() - loop_started

    model_out = save_final_model(out_dir, model, model_dir, world)
    result = TrainResult(
        tokens_seen=total_steps * tokens_per_step,
        steps=total_steps,
        final_loss=last_loss,
        wall_seconds=time.perf_counter() - started,
        tokens_per_second=(total_steps - start_step) * tokens_per_step / max(loop_seconds, 1e-9),
        start_step=start_step,
        model_dir=str(model_out),
    )
    if world.is_main:  # written last: its presence means the model and metrics are complete
        _atomic_write_text(out_dir / "result.json", json.dumps(dataclasses.asdict(result), indent=2))
    world.barrier()
    return result


def accumulate_gradients(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batches: "BlockStream",
    step: int,
    settings: TrainSettings,
    device: torch.device,
) -> torch.Tensor:
    """Forward and backward over the step's micro-batches; returns their mean losses."""
    means = torch.zeros(len(LOSS_PARTS), device=device)
    for micro in range(settings.grad_accum):
        input_ids = batches.micro_batch(step, micro).to(device)
        with gradient_sync(model, enabled=micro == settings.grad_accum - 1):
            losses = forward_loss(model, teacher, input_ids, settings, device)
            # Micro-batches hold equal token counts, so the mean of their means is the
            # step's mean.
            (losses[0] / settings.grad_accum).backward()
        means += losses.detach() / settings.grad_accum
    return means


def forward_loss(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    input_ids: torch.Tensor,
    settings: TrainSettings,
    device: torch.device,
) -> torch.Tensor:
    """The LOSS_PARTS for one micro-batch: [total, divergence, cross-entropy, hidden] (NaN
    for a part that is not used)."""
    aligner = unwrap(model)  # a HiddenStateAligner when the hidden-state loss is on
    aligned = isinstance(aligner, HiddenStateAligner)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.dtype == "bfloat16")
    with autocast:
        teacher_logits = teacher_hidden = None
        if teacher is not None:
            with torch.no_grad(), _recording(aligner.teacher_layers(teacher) if aligned else []) as teacher_hidden:
                teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        if aligned:
            student_logits, student_hidden = model(input_ids)
        else:
            student_logits = model(input_ids=input_ids, use_cache=False).logits
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # next token; none after the last
    divergence, ce = chunked_losses(
        student_logits.flatten(0, 1),
        None if teacher_logits is None else teacher_logits.flatten(0, 1),
        labels.flatten(),
        kind=settings.loss,
        temperature=settings.temperature,
        with_ce=settings.loss == "cross_entropy" or settings.lm_loss_weight > 0,
    )
    hidden = hidden_state_loss(student_hidden, teacher_hidden) if aligned else divergence.new_tensor(float("nan"))
    if settings.loss == "cross_entropy":
        total = ce
    else:
        total = divergence
        if settings.lm_loss_weight > 0:
            total = total + settings.lm_loss_weight * ce
        if aligned:
            total = total + settings.hidden_loss_weight * hidden
    return torch.stack([total, divergence, ce, hidden])


LOSS_PARTS = ("loss", "divergence", "cross_entropy", "hidden")


# ----------------------------------------------------------------------------------------
# The intermediate-state loss


class HiddenStateAligner(torch.nn.Module):
    """The student plus a learned linear map from its hidden states to the teacher's.

    The first Minitron paper (2407.14679, section 3) adds to the logit loss a loss between
    intermediate states, with a linear projection when the widths differ, and found it helps
    only after heavy depth pruning; ModelOpt's version is a cosine loss on hidden states
    (HiddenStateCosineLoss). Here each student layer's output is compared with the output of
    the teacher layer it was pruned from (`pruning_map["teacher_layers"]`, written by
    `builder.prune`). The projection starts as the pruning's own channel selection (student
    channel i -> the teacher channel it was cut from), so at step 0 it adds nothing the pruning
    did not; it trains with the student and is dropped when the student is saved.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, pruning_map: dict | None):
        super().__init__()
        self.student = student
        student_width, teacher_width = student.config.hidden_size, teacher.config.hidden_size
        self.teacher_layer_indices = _teacher_layer_indices(pruning_map, student.config.num_hidden_layers,
                                                            teacher.config.num_hidden_layers)
        self.projection = torch.nn.Linear(student_width, teacher_width, bias=False)
        channels = (pruning_map or {}).get("hidden_channels")
        if channels is None and student_width == teacher_width:
            channels = list(range(teacher_width))
        if channels is not None:
            with torch.no_grad():
                self.projection.weight.zero_()
                self.projection.weight[torch.tensor(channels), torch.arange(student_width)] = 1.0

    def teacher_layers(self, teacher: torch.nn.Module) -> list[torch.nn.Module]:
        return [teacher.model.layers[i] for i in self.teacher_layer_indices]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with _recording(list(self.student.model.layers)) as hidden:
            logits = self.student(input_ids=input_ids, use_cache=False).logits
        return logits, [self.projection(h) for h in hidden]


def _teacher_layer_indices(pruning_map: dict | None, student_layers: int, teacher_layers: int) -> list[int]:
    if pruning_map and pruning_map.get("teacher_layers") is not None:
        return list(pruning_map["teacher_layers"])
    # No record of the pruning: spread the student's layers evenly over the teacher's.
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


@contextlib.contextmanager
def _recording(layers: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collects each layer's output (the residual stream after it) during the block."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def hidden_state_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layer pairs and tokens of 1 - cosine(projected student state, teacher state)."""
    if len(student_hidden) != len(teacher_hidden):
        raise RuntimeError(f"recorded {len(student_hidden)} student and {len(teacher_hidden)} teacher states")
    distances = [1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean()
                 for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(distances).mean()


def student_of(model: torch.nn.Module) -> torch.nn.Module:
    """The trained model, under DDP and the hidden-state aligner."""
    inner = unwrap(model)
    return inner.student if isinstance(inner, HiddenStateAligner) else inner


# ----------------------------------------------------------------------------------------
# Losses


def chunked_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kind: Loss = "forward_kl",
    temperature: float = 1.0,
    with_ce: bool = False,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence, cross-entropy) means over tokens, from logits [tokens, vocab].

    The divergence is per token, averaged over all tokens and scaled by T^2 (so gradients
    keep their size as T changes, Hinton et al.); the cross-entropy is averaged over the
    tokens whose label is not -100. A part that is not asked for is NaN.
    """
    return _ChunkedLosses.apply(student_logits, teacher_logits, labels, kind, temperature, with_ce, chunk_tokens)


class _ChunkedLosses(torch.autograd.Function):
    """The losses, and their gradients with respect to the student logits, chunk by chunk.

    Each chunk's gradient is taken in forward, while its temporaries (log-softmaxes,
    probabilities) are still alive, and written into one logits-sized buffer; backward only
    scales that buffer by the incoming gradient (the losses are scalars). So the loss runs
    forward once, no chunk-sized temporary outlives its chunk, and neither set of logits has
    to be kept for backward. Recomputing each chunk in backward instead (activation
    checkpointing) ran the loss forward twice and summed one zero-filled logits-sized gradient
    per chunk: with the division by T = 1 that is now skipped, about 18% of a CPU distillation
    step (SmolLM2-135M -> 90M student, 4 x 256 tokens, torch.profiler). forward_kl, the
    default, has its gradient written out; the other losses get theirs from autograd.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kind, temperature, with_ce, chunk_tokens):
        tokens, has_teacher = student_logits.shape[0], teacher_logits is not None
        wants_grad = ctx.needs_input_grad[0]
        ce_count = (labels != -100).sum().clamp(min=1)  # a tensor: no GPU sync
        # Each buffer holds d(mean loss) / d(logits); the scales turn chunk sums into means.
        div_grad = torch.empty_like(student_logits) if wants_grad and has_teacher else None
        ce_grad = torch.empty_like(student_logits) if wants_grad and with_ce else None
        scales = (temperature**2 / tokens, 1 / ce_count.float())
        div_sum = ce_sum = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, tokens, chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            student = student_logits[chunk].detach()
            teacher = teacher_logits[chunk].detach() if has_teacher else None
            grads = (None if div_grad is None else div_grad[chunk], None if ce_grad is None else ce_grad[chunk])
            if has_teacher and kind == "forward_kl":  # the default: a hand-written gradient
                div, grad = _forward_kl_sum_and_grad(student, teacher, temperature)
                if grads[0] is not None:
                    torch.mul(grad, scales[0], out=grads[0])
                ce = div.new_zeros(())
                if with_ce:
                    _, ce = _chunk_sums_and_grads(student, None, labels[chunk], kind, temperature,
                                                  True, (None, grads[1]), scales)  # fmt: skip
            else:
                div, ce = _chunk_sums_and_grads(student, teacher, labels[chunk], kind, temperature,
                                                with_ce, grads, scales)  # fmt: skip
            div_sum, ce_sum = div_sum + div, ce_sum + ce
        ctx.save_for_backward(div_grad, ce_grad)
        nan = student_logits.new_tensor(float("nan"), dtype=torch.float32)
        divergence = div_sum * temperature**2 / tokens if has_teacher else nan
        return divergence, ce_sum / ce_count if with_ce else nan

    @staticmethod
    def backward(ctx, div_output_grad, ce_output_grad):
        div_grad, ce_grad = ctx.saved_tensors
        grad = None
        if div_grad is not None:
            grad = div_grad * div_output_grad.to(div_grad.dtype)
        if ce_grad is not None:
            scaled = ce_grad * ce_output_grad.to(ce_grad.dtype)
            grad = scaled if grad is None else grad + scaled
        return grad, None, None, None, None, None, None


def _chunk_sums_and_grads(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    with_ce: bool,
    grads_out: tuple[torch.Tensor | None, torch.Tensor | None],
    scales: tuple[float, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's (divergence sum, cross-entropy sum), their scaled gradients (by autograd)
    written into `grads_out` where it holds a tensor."""
    div_out, ce_out = grads_out
    with torch.enable_grad():
        student = student.requires_grad_(div_out is not None or ce_out is not None)
        div, ce = _chunk_loss_sums(student, teacher, labels, kind, temperature, with_ce)
    if div_out is not None:  # keep the graph when the cross-entropy needs it next
        (grad,) = torch.autograd.grad(div, student, div.new_tensor(scales[0]), retain_graph=ce_out is not None)
        div_out.copy_(grad)
    if ce_out is not None:
        ce_out.copy_(torch.autograd.grad(ce, student, scales[1].to(ce.dtype))[0])
    return div.detach(), ce.detach()


def _chunk_loss_sums(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    with_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # One log-softmax per model per chunk, in fp32 whatever the logits' dtype.
    div = ce = student.new_zeros((), dtype=torch.float32)
    log_p = None
    if teacher is not None or temperature == 1:
        log_p = F.log_softmax(_softened(student, temperature), dim=-1)
    if teacher is not None:
        log_q = F.log_softmax(_softened(teacher, temperature), dim=-1)
        div = divergence_sum(log_p, log_q, kind)
    if with_ce:
        log_p1 = log_p if temperature == 1 else F.log_softmax(student.float(), dim=-1)
        ce = F.nll_loss(log_p1, labels, ignore_index=-100, reduction="sum")
    return div, ce


def _forward_kl_sum_and_grad(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) summed over a chunk, and its gradient with respect to `student`.

    The gradient is (softmax(s/T) - softmax(t/T)) / T per token: written out, it takes one
    exp per model, where autograd through kl_div and log_softmax made three more passes over
    the chunk (about a third of the loss's time on a CPU).
    """
    log_p = F.log_softmax(_softened(student, temperature), dim=-1)
    log_q = F.log_softmax(_softened(teacher, temperature), dim=-1)
    q = log_q.exp()
    div = torch.sub(log_q, log_p).mul_(q).sum()  # what kl_div(log_target=True, "sum") computes
    grad = log_p.exp_().sub_(q)  # p - q, in log_p's memory
    return div, grad if temperature == 1 else grad.div_(temperature)


def _softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # Dividing by 1 is exact but still copies a chunk: skip it (and .float() of fp32 is free).
    return logits.float() if temperature == 1 else logits.float() / temperature


def divergence_sum(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed divergence between student log-probs `log_p` and teacher log-probs `log_q`."""
    if kind == "forward_kl":  # KL(teacher || student): mass-covering, the Minitron choice
        return F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    if kind == "reverse_kl":  # KL(student || teacher): mode-seeking
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    if kind == "jsd":  # 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)
        return 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="sum")
                      + F.kl_div(log_m, log_q, log_target=True, reduction="sum"))  # fmt: skip
    raise ValueError(f"loss={kind!r} is not a divergence; use forward_kl, reverse_kl or jsd")


# ----------------------------------------------------------------------------------------
# Distributed plumbing: one process, DDP or FSDP2, decided by torch.distributed


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    distributed: bool  # a process group exists (it may hold a single process)

    @classmethod
    def current(cls) -> "World":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), True)
        return cls(0, 1, False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.size > 1:  # SUM, then divide: gloo has no AVG
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values / self.size
        return values

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def gather(self, obj: object) -> list[object]:
        if self.size == 1:
            return [obj]
        gathered: list[object] = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered


def default_device() -> torch.device:
    """This process's GPU (LOCAL_RANK picks it under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _warn_if_bf16_is_emulated(settings: TrainSettings, device: torch.device) -> None:
    # A CPU without AVX-512 has no bf16 instructions: bf16 matmuls are emulated, and were
    # 70x slower than fp32 on an AVX2 machine (0.5 vs 38 GFLOP/s per core).
    if settings.dtype == "bfloat16" and device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.startswith("AVX512"):
            log.warning("dtype='bfloat16' on a %s CPU runs far slower than float32; use float32", capability)


def load_model(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    trainable: bool,
    settings: TrainSettings | None = None,
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM  # heavy import, only when training

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    if not trainable:  # the teacher: inference only, no autograd graph, no dropout
        return model.eval().requires_grad_(False)
    if settings is not None and settings.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wrap_for_distributed(
    model: torch.nn.Module, device: torch.device, world: World, parallel: Parallel
) -> torch.nn.Module:
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r} is not supported; use 'ddp' or 'fsdp'")
    if not world.distributed:  # one process, no process group: nothing to wrap
        return model
    if parallel == "fsdp":
        return _fully_shard(model, device)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _fully_shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: one shard group per decoder layer, the root holds embeddings and the LM head.

    Tied embeddings stay correct because the input embedding and the LM head both live in
    the root group, so the shared tensor is sharded once.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    student = model.student if isinstance(model, HiddenStateAligner) else model
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 in place


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D tensors), as is usual for transformers.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) is about 6x faster than the default foreach one on CPU.
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=True)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = min(settings.warmup(total_steps), total_steps)
    floor = settings.min_lr_ratio

    def factor(step: int) -> float:  # `step` optimizer steps taken; the next one uses this
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return float(norm)


# A loss this many times its starting value (the mean of the run's first LOSS_BASELINE_STEPS
# steps; before those are in, of the steps so far) has exploded. A healthy run's loss falls
# from its start; step-to-step noise and a warm-up overshoot stay within a few times it, while
# a too-high learning rate sends it up by 100x and more (lr 0.99: 190x, within 3 steps). For
# cross-entropy, 10x any realistic start is far beyond log(vocabulary), worse than guessing
# uniformly. Averaging a few steps keeps one unusually easy batch from setting the bar.
EXPLODED_LOSS_FACTOR = 10.0
LOSS_BASELINE_STEPS = 3


def check_finite(step: int, loss: float, grad_norm: float, settings: TrainSettings,
                 start_losses: list[float] = (), section: str = "distill", last_checkpoint: int = 0) -> None:
    """Stop before a NaN, or a loss that exploded, reaches the weights. Every rank sees the
    same values, so all stop. `section` names the spec section that configured the run."""
    hint = _divergence_hint(settings, section, last_checkpoint)
    if not math.isfinite(loss):
        raise TrainingDiverged(step, "the loss", loss, hint)
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(step, "the gradient norm", grad_norm, hint)
    if start_losses:  # the steps before this one: an exploding step never raises its own bar
        start = sum(start_losses) / len(start_losses)
        if start > 0 and loss > EXPLODED_LOSS_FACTOR * start:
            raise TrainingDiverged(step, "the loss", loss, f"{loss / start:.0f}x its starting {start:.4g} "
                                   f"(the limit is {EXPLODED_LOSS_FACTOR:g}x); {hint}")


def _divergence_hint(settings: TrainSettings, section: str, last_checkpoint: int) -> str:
    """The spec fields to change (never knobs the spec does not have), and a checkpoint only
    when one was saved."""
    hint = f"lower {section}.learning_rate (now {settings.learning_rate:g})"
    if section == "distill":
        hint += " (or the student's own students[].distill.learning_rate if it sets one)"
    hint += ", or train in float32 (`--precision float32`)"
    if last_checkpoint > 0:
        hint += f"; the checkpoint of step {last_checkpoint} in the stage's folder is from before the divergence"
    return hint


# ----------------------------------------------------------------------------------------
# Data: a deterministic stream of blocks


class BlockStream:
    """Block i of the stream is block perm_e[i % N] of epoch e = i // N.

    Each epoch has its own permutation drawn from (seed, epoch), so the order depends only
    on the seed and a position in the stream. Step s reads positions [(s-1)G, sG) with
    G = batch_size * grad_accum * world_size, micro-batches interleaved over ranks, so a
    run resumed at step s reads exactly what an uninterrupted run would have read.
    """

    def __init__(self, blocks: torch.Tensor, settings: TrainSettings, world: World):
        self.blocks, self.seed, self.world = blocks, settings.seed, world
        self.batch_size, self.grad_accum = settings.batch_size, settings.grad_accum
        self._perms: dict[int, torch.Tensor] = {}

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        per_step = self.batch_size * self.grad_accum * self.world.size
        offset = (micro * self.world.size + self.world.rank) * self.batch_size
        return self.take((step - 1) * per_step + offset, self.batch_size)

    def take(self, first: int, count: int) -> torch.Tensor:
        n = self.blocks.shape[0]
        rows = [self._perm(i // n)[i % n] for i in range(first, first + count)]
        return self.blocks[torch.stack(rows)]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # Keep two epochs: a batch may straddle an epoch boundary.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.blocks.shape[0], generator=generator)
        return self._perms[epoch]


def _checked_blocks(train_blocks: torch.Tensor | str | Path) -> torch.Tensor:
    blocks = train_blocks if isinstance(train_blocks, torch.Tensor) else load_blocks(train_blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(
            f"train_blocks has shape {tuple(blocks.shape)}; it must be [blocks, seq_len] with "
            "at least one block of at least 2 tokens (the acquire stage's packed blocks)"
        )
    if blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise ValueError(f"train_blocks has dtype {blocks.dtype}; token ids must be integers")
    return blocks.long()


def _check_token_ids(blocks: torch.Tensor, vocab_size: int) -> None:
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"train_blocks holds token ids in [{low}, {high}] but the model's vocab_size is "
            f"{vocab_size}; tokenize the data with the teacher's tokenizer"
        )


def _check_same_vocab(teacher, student, teacher_dir, student_dir) -> None:
    t, s = teacher.config.vocab_size, student.config.vocab_size
    if t != s:
        raise ValueError(
            f"teacher {teacher_dir} has vocab_size {t} but student {student_dir} has {s}; "
            "logit distillation needs the same vocabulary (prune the student from this teacher)"
        )


# ----------------------------------------------------------------------------------------
# Checkpoints: written by rank 0, atomically; read by every rank from shared disk


def save_checkpoint(
    out_dir: Path, model, optimizer, scheduler, world: World, plan: dict, step: int, loss: float
) -> None:
    model_state, optim_state = _full_state_dicts(model, optimizer)
    rng = world.gather(_rng_state())  # a collective: every rank takes part
    if not world.is_main:
        return
    state = {
        "step": step, "loss": loss, "plan": plan, "world_size": world.size, "model": model_state,
        "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng,
    }  # fmt: skip
    root = out_dir / "checkpoints"
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)
    _fsync_dir(root)
    _atomic_write_text(root / "latest", name)  # last: `latest` only names complete checkpoints
    _remove_old_checkpoints(root, keep={name})


def resume_from_checkpoint(out_dir: Path, model, optimizer, scheduler, world: World, plan: dict) -> dict:
    """Load `latest` into the model, optimizer and scheduler; {} when there is none."""
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return {}
    path = out_dir / "checkpoints" / pointer.read_text().strip() / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["plan"] != plan:
        raise ValueError(
            f"the checkpoint {path} belongs to a run with {state['plan']}, not {plan}; resume "
            "with the same tokens, seed and batch_size * grad_accum * world_size, or use a new out_dir"
        )
    _load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] == world.size:  # RNG streams are per rank; reuse them when they fit
        _set_rng_state(state["rng"][world.rank])
    return state


def _full_state_dicts(model, optimizer) -> tuple[dict, dict]:
    if is_fsdp(model):  # gather the shards into full tensors on rank 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def _full_model_state_dict(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    # The gathered dict repeats tied tensors (lm_head = embed_tokens); save_pretrained
    # expects them once, as it writes them from an unsharded model.
    seen: set[int] = set()
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return {name: tensor for name, tensor in state.items() if name not in tied}


def _load_full_state_dicts(model, optimizer, model_state: dict, optim_state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state, options=options)  # fmt: skip
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_old_checkpoints(root: Path, keep: set[str]) -> None:
    for path in root.iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)  # older steps and .tmp-* left by a kill


def save_final_model(out_dir: Path, model, source_dir: str | Path, world: World) -> Path:
    """`out_dir/model`: a plain HF checkpoint (safetensors) with the source's tokenizer."""
    state = _full_model_state_dict(model) if is_fsdp(model) else None  # a collective
    final = out_dir / "model"
    if not world.is_main:
        return final
    tmp = out_dir / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None and isinstance(unwrap(model), HiddenStateAligner):  # the student's part only
        state = {name.removeprefix("student."): t for name, t in state.items() if name.startswith("student.")}
    student_of(model).save_pretrained(tmp, state_dict=state)
    _copy_tokenizer_files(Path(source_dir), tmp)
    if (Path(source_dir) / PRUNING_MAP).exists():  # lineage, and the layer map for a later distillation
        shutil.copy2(Path(source_dir) / PRUNING_MAP, tmp / PRUNING_MAP)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(out_dir)
    return final


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and any(fnmatch.fnmatch(path.name, name) for name in TOKENIZER_FILES):
            shutil.copy2(path, target / path.name)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """metrics.jsonl on rank 0. On resume, lines past the checkpoint step are dropped: the
    killed run logged them, and this run logs those steps again."""

    def __init__(self, path: Path, enabled: bool, keep_up_to: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [line for line in _read_lines(path) if json.loads(line)["step"] <= keep_up_to]
            _atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [line for line in lines if line.strip() and _is_json(line)]  # a kill may cut the last


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _step_metrics(step, sums, lr, grad_norm, tokens, seconds, settings) -> dict:
    loss, divergence, ce, hidden = (float(v) for v in sums)
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    if settings.loss != "cross_entropy":  # named "kl" whichever divergence settings.loss picks
        record["kl"] = divergence
    if not math.isnan(ce):
        record["ce"] = ce
    if not math.isnan(hidden):
        record["hidden"] = hidden
    record.update({"tokens": step * tokens, "tokens_per_s": tokens / seconds})
    return record
