"""Does the estimate's memory model hold? Predicted vs measured peak memory per training rank.

    .venv/bin/python -m bench.memory [--quick]                 # bench/results/memory.json
    .venv/bin/python -m bench.memory --quick --device cuda     # memory-cuda.json (bench.gpu runs it)

One distillation (a random Llama-architecture student learning from a random teacher of the
same shape, float32, as a CPU trains) on two gloo workers, once per layout: DDP and FSDP,
each with and without activation checkpointing. Each rank measures its own peak and the
prediction is `builder.planning.cost_model.training_memory` for the same models, micro-batch,
sequence length, workers, parallelism and dtype. Goal: every ratio measured / predicted
within 1.5x (tests/test_memory.py holds one FSDP run to it).

How a rank measures: torch's CPU allocator is invisible to tracemalloc, so the peak is the
process's anonymous resident memory (RssAnon in /proc/self/status), sampled every 2 ms by a
thread, minus its value after the imports and the process group and before any model is
built. Anonymous, not VmHWM (whole RSS): loading reads safetensors files through mmap, and
those file pages count in RSS while mapped though no GPU would ever hold them; VmHWM minus its
own baseline is recorded too. The workers run with MALLOC_MMAP_THRESHOLD_=65536: glibc
otherwise keeps freed heap memory resident, so RSS would show its high-water and
fragmentation (FSDP's all-gather/free cycles fragment most) rather than live tensors; with
every allocation of 64 KiB or more its own mapping, a freed tensor leaves RSS at once and
the sampled peak follows live memory, what the model predicts (torch.cuda.max_memory_allocated
on a GPU). The models are tens of MB (~17M parameters, ~270 MB of training
state, ~100 MB of logits a micro-batch) so the interpreter's and gloo's own megabytes do not
dominate, while two ranks still fit this 2-core machine in seconds per step.

With `--device cuda` the same runs train in bf16 over NCCL, one worker per GPU (two at most;
with one GPU only the unwrapped single-process run, checkpointing off and on), and a rank's
peak is torch.cuda.max_memory_allocated over memory_allocated before the models (the CUDA
context and cuBLAS workspace are outside both, as outside the model). Not run yet: no GPU
was lent while it was written.

The passes without gradients, each in a process of its own, over the model already loaded
(imports and the load first, the modelling code transformers imports on the first load
included), its peak over that baseline plus the weights as the model counts them: on this
CPU transformers 5 maps a float32 checkpoint's tensors from the safetensors file (file pages,
not RssAnon), so a baseline before the load would count tens of MB of imports and none of the
weights. They are: the evaluate stage's held-out perplexity pass over EVAL_BATCH blocks
(builder.models.next_token_nll, the LM head in chunks: evaluators.perplexity.perplexity_memory);
score's importance pass over SCORE_BATCH blocks, then the same with its LM-loss pass
(builder.pruning.importance.importance_memory, float32); one teach batch of SCORE_BATCH blocks,
top-256 with 16 tail draws (builder.teaching.teach_pass.teach_memory); and lm-eval's part of
the evaluate stage (LM_EVAL_TASK's first LM_EVAL_LIMIT documents through
evaluators.lm_eval_runner.LmEval, offline from the bundled tasks, batches of EVAL_BATCH, with
the embedded teacher's tokenizer and vocabulary) against the dry run's own prediction,
LmEval.estimate(...).forward_memory_of (lm_eval_memory at cost_model.lm_eval_longest); that
run records each batch's padded shape.

Not measured: bf16 on a CPU (without native bf16 it is emulated; the model's bf16 terms are
the float32 ones halved).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from unittest import mock

from bench.common import PeriodicSampler, print_table, write_result

# A Llama of ~17M parameters (tied embeddings): 4.2M in the embedding, 3.1M per layer.
CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
MICRO_BATCH, SEQ_LEN, WORKERS = 4, 256, 2
EVAL_BATCH = 16  # blocks a perplexity forward: the families' evaluation batch_size
SCORE_BATCH = 8  # blocks a score or teach forward: the scoring section's default batch_size
TOP_K, TAIL_SAMPLES = 256, 16  # the teach pass's signal: bench.gpu's real-shape family's
LAYOUTS = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))
SAMPLE_EVERY_S = 0.002
MMAP_THRESHOLD = 64 * 1024  # bytes: larger allocations are their own mappings (see the docstring)


@dataclass(frozen=True)
class Run:
    parallel: str
    checkpointing: bool
    steps: int = 2
    device: str = "cpu"  # or "cuda": bf16 over NCCL, one worker per GPU
    workers: int = WORKERS

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"


def save_models(root: Path) -> tuple[Path, Path]:
    """(teacher, student): random checkpoints of CONFIG, different seeds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = []
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1]


def predicted(run: Run) -> dict:
    """The memory model's bytes per rank for this run, by term."""
    from transformers import LlamaConfig

    from builder.planning.cost_model import training_memory
    from builder.training.parallel import device_memory

    import torch

    config = LlamaConfig(**CONFIG)
    memory = training_memory(config, config, MICRO_BATCH, SEQ_LEN, run.workers, run.parallel,
                             checkpointing=run.checkpointing, dtype=run.dtype,
                             device_bytes=device_memory(torch.device(run.device, 0)))
    return asdict(memory) | {"total": memory.total}


class PeakSampler(PeriodicSampler):
    """The highest RssAnon of this process while it runs."""

    def __init__(self):
        super().__init__(every_s=SAMPLE_EVERY_S)
        self.baseline = self.peak = rss_anon()

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon())


def rss_anon() -> int:
    return _status_bytes("RssAnon")


def vm_hwm() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _rank(rank: int, rendezvous: str, models: tuple[str, str], blocks: str, out: str, run: Run) -> None:
    """One training rank: imports and process group first, then the measured run. One worker
    alone runs without a process group, as a single-worker stage does (nothing is wrapped)."""
    import gc

    import torch
    import torch.distributed as dist

    from builder.training.loop import distill
    from builder.training.settings import TrainSettings

    device = torch.device(run.device, rank) if run.device == "cuda" else torch.device("cpu")
    if run.device == "cuda":
        torch.cuda.set_device(device)
    if run.workers > 1:
        dist.init_process_group("nccl" if run.device == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                                rank=rank, world_size=run.workers)
    try:
        torch.set_num_threads(1)
        data = torch.load(blocks)
        settings = TrainSettings(tokens=run.steps * MICRO_BATCH * run.workers * SEQ_LEN, batch_size=MICRO_BATCH,
                                 warmup_steps=0, checkpoint_every=10_000, activation_checkpointing=run.checkpointing,
                                 dtype=run.dtype)
        gc.collect()
        if run.workers > 1:
            dist.barrier()
        with Peak(device) as peak:
            distill(*models, data, Path(out) / "run", settings, device=device, parallel=run.parallel)
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, **peak.result()}))
    finally:
        if run.workers > 1:
            dist.destroy_process_group()


class Peak:
    """A rank's peak over its value on entry: sampled RssAnon on a CPU (and VmHWM's rise, for
    reference), torch.cuda.max_memory_allocated on a GPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self) -> "Peak":
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.hwm_before, self.sampler = vm_hwm(), PeakSampler().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            import torch

            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.sampler.__exit__(*exc)
            self.baseline, self.peak, self.hwm = self.sampler.baseline, self.sampler.peak, vm_hwm() - self.hwm_before

    def result(self) -> dict:
        extra = {"hwm_bytes": self.hwm} if self.device.type == "cpu" else {}
        return {"peak_bytes": self.peak - self.baseline, "baseline_bytes": self.baseline, **extra}


def measure(run: Run, work: Path, models: tuple[Path, Path]) -> list[dict]:
    """Each rank's measured peak (bytes over its baseline), by rank."""
    import torch
    import torch.multiprocessing as mp

    out = work / f"{run.device}-{run.parallel}-{int(run.checkpointing)}"
    out.mkdir(parents=True)
    blocks = out / "blocks.pt"
    torch.save(torch.randint(3, CONFIG["vocab_size"], (MICRO_BATCH * run.workers * run.steps, SEQ_LEN),
                             generator=torch.Generator().manual_seed(0)), blocks)
    with _mmap_threshold():  # read by glibc as each worker starts
        mp.spawn(_rank, args=(str(out / "rendezvous"), tuple(map(str, models)), str(blocks), str(out), run),
                 nprocs=run.workers)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(run.workers)]


def _mmap_threshold():
    """MALLOC_MMAP_THRESHOLD_ for the processes started inside (this one's environment is
    restored after): the standard library's patch.dict, not a context manager of our own."""
    return mock.patch.dict(os.environ, {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})


def compare(run: Run, work: Path, models: tuple[Path, Path]) -> dict:
    prediction, ranks = predicted(run), measure(run, work, models)
    ratios = [rank["peak_bytes"] / prediction["total"] for rank in ranks]
    return {"parallel": run.parallel, "activation_checkpointing": run.checkpointing, "steps": run.steps,
            "device": run.device, "workers": run.workers, "dtype": run.dtype,
            "predicted": prediction, "ranks": ranks, "ratios": ratios,
            "within_1_5x": all(1 / 1.5 <= ratio <= 1.5 for ratio in ratios)}


def _spawned(target, name: str, batch: int, device: str, folder: Path, model_dir: Path) -> dict:
    """`target(model_dir, blocks, out, device)` in a spawned process over `batch` random blocks
    (saved in `folder`); what it wrote to `out` (its peak)."""
    import torch

    folder.mkdir(parents=True)
    blocks, out = folder / "blocks.pt", folder / "peak.json"
    torch.save(torch.randint(3, CONFIG["vocab_size"], (batch, SEQ_LEN), generator=torch.Generator().manual_seed(1)),
               blocks)
    return _measured_in_a_process(target, (str(model_dir), str(blocks), str(out), device), out, name)


def _measured_in_a_process(target, args: tuple, out: Path, name: str, env: dict | None = None) -> dict:
    """`target(*args)` in a spawned process with MALLOC_MMAP_THRESHOLD_ (and `env`) set; what
    it wrote to `out` (its peak)."""
    import multiprocessing

    with _mmap_threshold(), mock.patch.dict(os.environ, env or {}):
        process = multiprocessing.get_context("spawn").Process(target=target, args=args)
        process.start()
        process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the {name} run exited with {process.exitcode}")
    return json.loads(out.read_text())


def _judged(memory, measured: dict) -> dict:
    """A pass measured over its loaded model against its prediction: the measured peak plus
    the weights as the model counts them, over the predicted total, by the 1.5x rule."""
    ratio = (measured["peak_bytes"] + memory.weights) / memory.total
    return {"predicted": asdict(memory) | {"total": memory.total}, "measured": measured, "ratio": ratio,
            "within_1_5x": 1 / 1.5 <= ratio <= 1.5}


def _importance(model, blocks, dtype: str, lm_loss_samples: int = 0) -> None:
    """The score stage's pass: importance over the blocks, and with `lm_loss_samples` the
    LM-loss pass after it."""
    from builder.pruning.importance import score_importance

    score_importance(model, blocks, batch_size=SCORE_BATCH, lm_loss_samples=lm_loss_samples, progress=False)


def _perplexity(model, blocks, dtype: str) -> None:
    """The evaluate stage's held-out perplexity pass."""
    from evaluators.perplexity import heldout_perplexity

    heldout_perplexity(model, blocks, EVAL_BATCH, progress=False)


def _signal(model, blocks, dtype: str) -> None:
    """One teach actor's batch: the teacher's stored signal (top-k and tail draws)."""
    from builder.teaching.signal import SignalLayout
    from builder.teaching.teach_pass import batch_signal

    layout = SignalLayout.plan(len(blocks), len(blocks), SEQ_LEN, TOP_K, 1.0, CONFIG["vocab_size"], TAIL_SAMPLES)
    batch_signal(model, blocks, layout, dtype, layout.draws(0))


# The passes without gradients, each measured over its loaded model (see the module docstring),
# in a process of its own: the pass, and the blocks it runs over.
PASSES = {"evaluate (perplexity)": (_perplexity, EVAL_BATCH),
          "score (importance)": (_importance, SCORE_BATCH),
          "score (LM loss)": (partial(_importance, lm_loss_samples=SCORE_BATCH), SCORE_BATCH),
          "teach": (_signal, SCORE_BATCH)}


def _over_the_model(name: str, model_dir: str, blocks: str, out: str, device: str) -> None:
    """One of PASSES: imports and the model's load first (the modelling code transformers
    imports on the first load included), then the measured pass."""
    import gc

    import torch

    from builder.models.loading import load_model
    from builder.training.settings import DTYPES

    torch.set_num_threads(1)
    data = torch.load(blocks)
    placed = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    dtype = pass_dtype(name, device)
    model = load_model(model_dir, placed, DTYPES[dtype])
    gc.collect()
    with Peak(placed) as peak:
        PASSES[name][0](model, data, dtype)
    Path(out).write_text(json.dumps(peak.result()))


def pass_dtype(name: str, device: str) -> str:
    """What the stage holds its model in: score float32 wherever it runs, teach and evaluate bf16 on a GPU."""
    return "bfloat16" if device == "cuda" and not name.startswith("score") else "float32"


def predicted_pass(name: str, dtype: str):
    """The estimate's ForwardMemory of one of PASSES."""
    from transformers import LlamaConfig

    from builder.pruning.importance import importance_memory
    from builder.teaching.teach_pass import teach_memory
    from evaluators.perplexity import perplexity_memory

    config = LlamaConfig(**CONFIG)
    if name == "evaluate (perplexity)":
        return perplexity_memory(config, dtype, EVAL_BATCH, SEQ_LEN)
    if name == "teach":
        return teach_memory(config, dtype, SCORE_BATCH, SEQ_LEN, TOP_K, TAIL_SAMPLES)
    return importance_memory(config, SCORE_BATCH, SEQ_LEN, lm_loss_batch=SCORE_BATCH if "LM loss" in name else 0)


def compare_pass(name: str, device: str, work: Path, model_dir: Path) -> dict:
    """One of PASSES: its measured peak over the loaded model plus the weights as the model
    counts them, against the prediction, by the same 1.5x rule."""
    dtype, batch = pass_dtype(name, device), PASSES[name][1]
    folder = work / name.replace(" ", "-").replace("(", "").replace(")", "")
    measured = _spawned(partial(_over_the_model, name), name, batch, device, folder, model_dir)
    return {"stage": name, "device": device, "dtype": dtype, "batch": batch,
            **_judged(predicted_pass(name, dtype), measured)}


# lm-eval's part of an evaluation: a task whose requests fill several batches of EVAL_BATCH, so
# that the peak sees the second batch forwarded while the first's log-softmax is still held.
LM_EVAL_TASK, LM_EVAL_LIMIT = "hellaswag", 16  # 16 documents x 4 endings: four batches of 16


def save_lm_eval_model(root: Path) -> Path:
    """CONFIG's Llama with the embedded teacher's tokenizer (SmolLM2's, read from its GGUF in
    seconds) and that tokenizer's vocabulary: the tokenizer that cost_model.LM_EVAL_TASKS and
    LM_EVAL_LONGEST were measured with, so the run forwards the lengths the prediction uses."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from builder.embedded import package_dir
    from builder.models.teacher import EMBEDDED_TEACHER_FILES

    package, filename = EMBEDDED_TEACHER_FILES["smollm2-135m-instruct"]
    tokenizer = AutoTokenizer.from_pretrained(package_dir(package), gguf_file=filename)
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(**(CONFIG | {"vocab_size": len(tokenizer)}))).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _lm_eval(model_dir: str, cache_dir: str, out: str) -> None:
    """lm-eval's part of the evaluate stage, in a process of its own, through the LmEval
    evaluator: imports, the tokenizer, the built task and the model's load first, then the
    measured lm-eval run. A forward pre-hook records each batch's padded shape."""
    import gc

    import torch

    from evaluators.base import ModelHandle
    from evaluators.lm_eval_runner import LmEval, LmEvalSettings, TaskRequest, _built_tasks, task_manager

    torch.set_num_threads(1)
    handle = ModelHandle(model_dir)
    handle.tokenizer()
    _built_tasks(task_manager("bundled", cache_dir), [LM_EVAL_TASK], 0)  # kept for the run below
    settings = LmEvalSettings((TaskRequest(LM_EVAL_TASK, limit=LM_EVAL_LIMIT),), batch_size=EVAL_BATCH,
                              cache_dir=Path(cache_dir))
    shapes = []
    handle.module("cpu").register_forward_pre_hook(lambda _, args: shapes.append(list(args[0].shape)))
    gc.collect()
    with Peak(torch.device("cpu")) as peak:
        LmEval().run(handle, settings, "cpu")
    Path(out).write_text(json.dumps(peak.result() | {"batches": shapes}))


def compare_lm_eval(work: Path) -> dict:
    """lm-eval's measured peak over the loaded model, plus the weights as the model counts them,
    against the dry-run estimate's prediction, LmEval.estimate(...).forward_memory_of, on the
    CPU (float32)."""
    from transformers import AutoConfig

    from builder.planning.cost_model import COSTS, lm_eval_longest
    from evaluators.lm_eval_runner import LmEval, LmEvalSettings, TaskRequest

    model_dir, out = save_lm_eval_model(work / "lm-eval-model"), work / "lm-eval.json"
    measured = _measured_in_a_process(_lm_eval, (str(model_dir), str(work / "cache"), str(out)), out, "lm-eval",
                                      env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    task = TaskRequest(LM_EVAL_TASK, limit=LM_EVAL_LIMIT)
    settings = LmEvalSettings((task,), batch_size=EVAL_BATCH)
    memory = LmEval().estimate(settings, AutoConfig.from_pretrained(model_dir), COSTS, SEQ_LEN).forward_memory_of(
        "float32")
    judged = _judged(memory, measured)
    judged["predicted"]["length"] = lm_eval_longest(asdict(task))
    return {"stage": "evaluate (lm-eval)", "device": "cpu", "dtype": "float32", "task": LM_EVAL_TASK,
            "limit": LM_EVAL_LIMIT, "batch": EVAL_BATCH, "longest_padded": max(s[1] for s in measured["batches"]),
            **judged}


def runs(device: str, steps: int) -> list[Run]:
    """Every layout on two workers; on a single GPU, the one-worker run (no wrapper) only."""
    if device == "cpu":
        return [Run(parallel, checkpointing, steps) for parallel, checkpointing in LAYOUTS]
    import torch

    workers = min(WORKERS, torch.cuda.device_count())
    layouts = LAYOUTS if workers > 1 else (("ddp", False), ("ddp", True))
    return [Run(parallel, checkpointing, steps, device, workers) for parallel, checkpointing in layouts]


def package_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "accelerate", "safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two steps a run (the peak is reached in the first)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        models = save_models(Path(tmp) / "models")
        for run in runs(args.device, 2 if args.quick else 4):
            result = compare(run, Path(tmp), models)
            results.append(result)
            mib = [r["peak_bytes"] / 2**20 for r in result["ranks"]]
            rows.append([f"{run.parallel} x{run.workers}", "on" if run.checkpointing else "off",
                         result["predicted"]["total"] / 2**20, " / ".join(f"{m:.1f}" for m in mib),
                         " / ".join(f"{r:.2f}" for r in result["ratios"])])
        passes = [compare_pass(name, args.device, Path(tmp), models[0]) for name in PASSES]
        passes += [compare_lm_eval(Path(tmp))] if args.device == "cpu" else []  # lm-eval runs on a CPU here
        rows += [[f"{result['stage']} x1", "-", result["predicted"]["total"] / 2**20,
                  f"{result['measured']['peak_bytes'] / 2**20:.1f} + weights", f"{result['ratio']:.2f}"]
                 for result in passes]
    print_table(["parallel", "act. ckpt", "predicted MiB", "measured MiB by rank", "measured / predicted"], rows)
    goal = all(result["within_1_5x"] for result in results + passes)
    print(f"goal (every ratio within 1.5x): {'met' if goal else 'NOT met'}")
    measure = (f"RssAnon peak over its value before the models, sampled every {SAMPLE_EVERY_S * 1000:g} ms, "
               f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}" if args.device == "cpu" else
               "torch.cuda.max_memory_allocated over memory_allocated before the models")
    path = write_result("memory" if args.device == "cpu" else "memory-cuda", {
        "quick": args.quick, "config": CONFIG, "micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN,
        "packages": package_versions(), "measure": measure, "runs": results, "passes": passes,
        "goal_met": goal})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
