"""The training loop, top to bottom, and its two public faces: distill and correct_teacher."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from builder.models.arch import count_params
from builder.models.loading import load_model
from builder.models.teacher_sharding import teacher_is_sharded
from builder.options.run_options import Parallel
from builder.pruning.cuts import read_pruning_map
from builder.store.stage_store import write_text_atomic
from builder.teaching.signal import TeacherSignal
from builder.training.aligner import HiddenStateAligner
from builder.training.checkpoints import resume_from_checkpoint, save_checkpoint, save_final_model
from builder.training.data import BlockStream, TrainBlocks, open_blocks, seq_len_of, verify_share
from builder.training.layouts import layout_of, layouts_until, resumed_layouts
from builder.training.metrics import MetricsLog, step_metrics
from builder.training.optim import make_optimizer, warmup_cosine_schedule
from builder.training.parallel import (
    World, default_device, device_memory, is_fsdp, student_of, warn_if_bf16_is_emulated, wrap_for_distributed,
)  # fmt: skip
from builder.training.sharded import load_sharded
from builder.training.settings import DTYPES, STORED_DTYPES, TrainResult, TrainSettings
from builder.training.step import DivergenceGuard, optimizer_step


def distill(
    teacher_dir: str | Path,
    student_dir: str | Path,
    train_blocks: TrainBlocks,
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    device: torch.device | None = None,
    parallel: Parallel = "ddp",
) -> TrainResult:
    """Train the student to match the frozen teacher's next-token distributions: the online
    teacher in `teacher_dir`, or, when `train_blocks` is a teach stage's dir (or an opened
    TeacherSignal), the teacher's stored top-k signal for each block (no teacher is loaded)."""
    if settings.loss == "cross_entropy":
        raise ValueError(
            "settings.loss='cross_entropy' ignores the teacher; use forward_kl (the Minitron "
            "default), reverse_kl or jsd to distill, or correct_teacher() to fine-tune"
        )
    return train(student_dir, Path(teacher_dir), train_blocks, out_dir, settings, device, parallel)


def correct_teacher(
    teacher_dir: str | Path,
    train_blocks: TrainBlocks,
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


def load_result(out_dir: str | Path) -> TrainResult:
    return TrainResult(**json.loads((Path(out_dir) / "result.json").read_text()))


# ----------------------------------------------------------------------------------------
# The training loop, top to bottom


def train(
    model_dir: str | Path,
    teacher_dir: Path | None,
    train_blocks: TrainBlocks,
    out_dir: str | Path,
    settings: TrainSettings,
    device: torch.device | None = None,
    parallel: Parallel = "ddp",
) -> TrainResult:
    """Train the model in `model_dir` (against the teacher's logits when one is given)."""
    started = time.perf_counter()
    out_dir, world, device = Path(out_dir), World.current(), _prepared_device(device, settings)
    blocks = open_blocks(train_blocks)  # memory-mapped: nothing is read yet
    verify_share(blocks, world)  # this worker's share of the shards, checked whole
    total_steps = settings.steps(seq_len_of(blocks), world.size)
    tokens_per_step = settings.batch_size * settings.grad_accum * world.size * seq_len_of(blocks)

    signal = blocks if isinstance(blocks, TeacherSignal) else None  # the teacher's stored top-k signal
    model, teacher = _load_models(Path(model_dir), None if signal else teacher_dir, settings, device, world, parallel)
    if signal is not None:
        _check_signal(signal, student_of(model), settings, model_dir)
        teacher = signal
    optimizer = make_optimizer(model, settings)
    scheduler = warmup_cosine_schedule(optimizer, settings, total_steps)

    # What a checkpoint must agree with to be resumed: same steps over the same data.
    plan = {"total_steps": total_steps, "tokens_per_step": tokens_per_step, "seed": settings.seed,
            "blocks": len(blocks)}
    resumed = resume_from_checkpoint(out_dir, model, optimizer, scheduler, world, plan)
    start_step, last_loss = resumed.get("step", 0), resumed.get("loss", float("nan"))
    earlier, layout = resumed_layouts(resumed), layout_of(settings, world, parallel)  # what makes which steps
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", enabled=world.is_main, keep_up_to=start_step)
    batches = BlockStream(blocks, settings, world, vocab_size=student_of(model).config.vocab_size)
    desc = "distill" if teacher is not None else "correct"
    progress_bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not world.is_main)
    loop_started = time.perf_counter()

    model.train()
    guard = DivergenceGuard(settings, "distill" if teacher is not None else "correction", checkpoint_step=start_step,
                            first_step=start_step + 1)
    with progress_bar as progress:  # closed on errors too
        for step in range(start_step + 1, total_steps + 1):
            step_started = time.perf_counter()
            losses, grad_norm, lr = optimizer_step(model, teacher, optimizer, scheduler, batches, step, settings,
                                                   device, world, guard)
            last_loss, seconds = losses[0].item(), time.perf_counter() - step_started
            if step % settings.log_every == 0 or step == total_steps:
                record = step_metrics(step, losses, lr, grad_norm, tokens_per_step, seconds, settings)
                metrics_log.write(record)
            progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_per_step / seconds:.0f}")
            progress.update(1)
            if step % settings.checkpoint_every == 0 and step < total_steps:
                done = {"step": step, "loss": last_loss, "samples": batches.samples_before(step + 1),
                        "layouts": layouts_until(earlier, layout, start_step + 1, step)}
                save_checkpoint(out_dir, model, optimizer, scheduler, world, plan, done)
                guard.checkpoint_step = step
    loop_seconds = time.perf_counter() - loop_started

    model_out = save_final_model(out_dir, model, model_dir, world, settings.max_shard_size,
                                 STORED_DTYPES[settings.stored_dtype])
    result = TrainResult(
        tokens_seen=total_steps * tokens_per_step,
        steps=total_steps,
        final_loss=last_loss,
        wall_seconds=time.perf_counter() - started,
        tokens_per_second=(total_steps - start_step) * tokens_per_step / max(loop_seconds, 1e-9),
        start_step=start_step,
        model_dir=str(model_out),
        layouts=layouts_until(earlier, layout, start_step + 1, total_steps),
    )
    if world.is_main:  # written last: its presence means the model and metrics are complete
        write_text_atomic(out_dir / "result.json", json.dumps(dataclasses.asdict(result), indent=2))
    world.barrier()
    return result


def _prepared_device(device: torch.device | None, settings: TrainSettings) -> torch.device:
    device = device or default_device()
    if device.type == "cuda":  # NCCL collectives run on the current device
        torch.cuda.set_device(device)
    warn_if_bf16_is_emulated(settings, device)
    return device


def _load_models(
    model_dir: Path, teacher_dir: Path | None, settings: TrainSettings, device: torch.device, world: World,
    parallel: Parallel,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(the model to train, wrapped for this world; the frozen teacher or None).

    Under FSDP2 the student is built on the meta device and each rank reads only its shard
    (builder.training.sharded), except with the hidden-state loss, whose aligner wraps the
    student whole before it is sharded. The frozen teacher is in the training dtype,
    replicated or sharded by builder.models.teacher_sharding's rule."""
    # Same seed on every rank: every replica starts from identical weights (FSDP shards them).
    torch.manual_seed(settings.seed)
    compute = DTYPES[settings.dtype]
    aligned = teacher_dir is not None and settings.hidden_loss_weight > 0
    if parallel == "fsdp" and world.distributed and not aligned:
        student = load_sharded(model_dir, device, torch.float32, trainable=True, compute_dtype=compute,
                               activation_checkpointing=settings.activation_checkpointing)
    else:
        student = load_model(model_dir, device, torch.float32, trainable=True,
                             activation_checkpointing=settings.activation_checkpointing)
    teacher = _load_teacher(teacher_dir, settings, device, world, parallel, aligned) if teacher_dir else None
    if teacher is not None:
        _check_same_vocab(teacher, student, teacher_dir, model_dir)
    if aligned:
        student = HiddenStateAligner(student, teacher, read_pruning_map(model_dir)).to(device)
    if is_fsdp(student):
        return student, teacher
    return wrap_for_distributed(student, device, world, parallel, compute), teacher


def _load_teacher(teacher_dir: Path, settings: TrainSettings, device: torch.device, world: World,
                  parallel: Parallel, aligned: bool) -> torch.nn.Module:
    """In the training dtype (bf16 when training in bf16: it only runs forward passes).
    Sharded (FSDP2, no optimizer state) when the placement rule says so; with the hidden-state
    loss always whole (the aligner records its layers' outputs through hooks on them).
    Untested on GPUs; on CPU both placements are tested with gloo."""
    dtype = DTYPES[settings.dtype]
    config = AutoConfig.from_pretrained(str(teacher_dir))
    whole = count_params(config) * dtype.itemsize
    if not aligned and world.distributed and teacher_is_sharded(whole, device_memory(device), parallel, world.size):
        return load_sharded(teacher_dir, device, dtype, trainable=False, compute_dtype=dtype)
    return load_model(teacher_dir, device, dtype, trainable=False)


def _check_signal(signal: TeacherSignal, student, settings: TrainSettings, student_dir) -> None:
    """A stored signal is only the online teacher's if it was taught for this vocabulary and
    temperature, and it has no hidden states to align."""
    layout, vocab = signal.layout, student.config.vocab_size
    problems = [
        f"it was taught for vocab_size {layout.vocab_size} but student {student_dir} has {vocab}"
        if layout.vocab_size != vocab else "",
        f"it holds log-probabilities at temperature {layout.temperature:g}, not {settings.temperature:g}"
        if layout.temperature != settings.temperature else "",
        "hidden_loss_weight > 0 needs the teacher's hidden states (distill with teacher_signal: online)"
        if settings.hidden_loss_weight > 0 else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"the teacher signal in {signal.stage_dir} cannot train this student: " + "; ".join(problems))


def _check_same_vocab(teacher, student, teacher_dir, student_dir) -> None:
    t, s = teacher.config.vocab_size, student.config.vocab_size
    if t != s:
        raise ValueError(
            f"teacher {teacher_dir} has vocab_size {t} but student {student_dir} has {s}; "
            "logit distillation needs the same vocabulary (prune the student from this teacher)"
        )
