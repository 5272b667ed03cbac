"""The first lent GPU's checklist: one command that exercises minizoo's CUDA paths in under 10 minutes.

    .venv/bin/python -m bench.gpu            # on a machine with CUDA torch (and vllm for step 3)
    .venv/bin/python -m bench.gpu --quick    # the same, smaller budgets (for a short device lease)

Four steps, each a subprocess with its own time limit, so one failure still leaves the
others' results; everything goes to bench/results/gpu.json (exit code 0 only if all passed):

1. rehearsal: `build-family families/qwen3-family.yaml --rehearse --gpus-per-stage 1` with the
   committed Qwen3-8B-Base config: bf16 autocast distillation and teacher correction on Ray
   Train over NCCL (FSDP2 with --parallel fsdp when two or more GPUs are visible, one worker
   per GPU), scoring, pruning, lm-eval on CUDA, vLLM's GPU engine (when vllm is installed),
   cards, a publish dry run; it passes only if every computing stage's manifest says it ran
   on CUDA (`summary.placement`, builder/running/placement.py): a stage on the CPU is a failure;
2. distillation speed: `python -m bench.distill --quick --device cuda` (bf16, MFU against the
   measured bf16 matmul peak), written to bench/results/distill-cuda.json;
3. vLLM throughput of the embedded SmolLM2-135M teacher on the GPU (bfloat16, 64 prompts);
4. the memory model: `python -m bench.memory --quick --device cuda` (per-rank peak of a bf16
   distillation against builder.planning.cost_model.training_memory; DDP and FSDP2 with
   activation checkpointing off and on when two GPUs are visible), bench/results/memory-cuda.json;
5. real shapes (bench/gpu_real_shape.py): a family of the embedded SmolLM2-135M at 2,048-token
   blocks (evaluation batch 16, a stored top-256 signal of three shards taught by two actors when
   two GPUs are there), built with --gpus-per-stage 1; it passes only if every computing stage
   ran on CUDA and each training, score, teach and evaluate stage's peak stayed within what the
   estimate predicted.

Without CUDA it stops at once and says so (exit code 2). Not run yet: no GPU was lent while
it was written, so every CUDA path it exercises is unverified until it is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, teacher_dir, write_result
from bench.gpu_real_shape import real_shape_step
from bench.gpu_steps import run_step, stages_not_on_cuda

QWEN_CONFIG = ROOT / "tests" / "data" / "configs" / "Qwen3-8B-Base.json"


def require_cuda() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"bench.gpu needs a CUDA GPU: torch {torch.__version__} sees none "
                         f"(built for CUDA {torch.version.cuda or 'none: a CPU build'}). Run it on a GPU "
                         "machine with a CUDA build of torch (and vllm for the throughput step).", file=sys.stderr)
        sys.exit(2)
    return torch.cuda.device_count()


def rehearsal_step(gpus: int, workdir: Path, log_dir: Path, timeout_s: float) -> dict:
    workers = ["--train-workers", str(min(gpus, 2))] + (["--parallel", "fsdp"] if gpus >= 2 else [])
    command = [sys.executable, "-m", "builder.cli", "families/qwen3-family.yaml", "--rehearse", "--teacher-config",
               str(QWEN_CONFIG), "--workdir", str(workdir), "--gpus-per-stage", "1", *workers]
    step = run_step("rehearsal", command, timeout_s, log_dir)
    step["placements"], step["not_on_cuda"] = stages_not_on_cuda(workdir / "rehearsal" / "stages")
    step["ok"] = step["ok"] and not step["not_on_cuda"]
    reports = list((workdir / "rehearsal").glob("*-rehearsal/report.json"))
    if reports:
        report = json.loads(reports[0].read_text())
        step["report"] = {"complete": report.get("complete"), "failures": report.get("failures"),
                          "students": [s["name"] for s in report.get("students", [])],
                          "throughput": {s["name"]: s.get("throughput") for s in report.get("students", [])}}
    return step


def throughput_step(log_dir: Path, timeout_s: float, quick: bool) -> dict:
    code = ("import json, sys; from pathlib import Path; "
            "from evaluators.throughput import ThroughputSettings, measure_throughput; "
            f"settings = ThroughputSettings(input_len=128, output_len=128, num_prompts={16 if quick else 64}, "
            "dtype='bfloat16', engine_args={'gpu_memory_utilization': 0.5, 'max_model_len': 512}); "
            f"print(json.dumps(measure_throughput({{'teacher': Path({str(teacher_dir())!r})}}, settings, "
            f"Path({str(log_dir / 'throughput')!r}))))")
    step = run_step("throughput", [sys.executable, "-c", code], timeout_s, log_dir)
    lines = [line for line in step["log_tail"].splitlines() if line.startswith("{")]
    if lines:
        step["results"] = json.loads(lines[-1])
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets, for a short device lease")
    args = parser.parse_args()
    gpus = require_cuda()
    scratch = Path(tempfile.mkdtemp(prefix="minizoo-gpu-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the rehearsal runs offline, as on this CPU machine
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    teacher_dir()  # converted once before the steps start their clocks
    # Each limit caps a step: with --quick they sum to 580 s, so all five fit one 10-minute device call.
    steps = {"rehearsal": rehearsal_step(gpus, scratch / "runs", scratch, 170 if args.quick else 300)}
    steps["real-shape"] = real_shape_step(gpus, scratch / "real-shape", scratch, 170 if args.quick else 300)
    steps["distill"] = run_step("distill", [sys.executable, "-m", "bench.distill", "--quick", "--device", "cuda"],
                                90 if args.quick else 180, scratch)
    if (RESULTS / "distill.json").exists() and steps["distill"]["ok"]:  # keep the CPU result where it was
        shutil.move(RESULTS / "distill.json", RESULTS / "distill-cuda.json")
        subprocess.run(["git", "checkout", "--", "bench/results/distill.json"], cwd=ROOT, check=False)
    steps["throughput"] = throughput_step(scratch, 60 if args.quick else 120, args.quick)
    steps["memory"] = run_step("memory", [sys.executable, "-m", "bench.memory", "--quick", "--device", "cuda"],
                               90 if args.quick else 180, scratch)
    ok = all(step["ok"] for step in steps.values())
    path = write_result("gpu", {"gpus": gpus, "quick": args.quick, "all_ok": ok, "steps": steps,
                                "host": machine()})
    print(f"{'all steps passed' if ok else 'some steps failed'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
