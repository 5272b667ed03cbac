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
   activation checkpointing off and on when two GPUs are visible), bench/results/memory-cuda.json.

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
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, teacher_dir, write_result

QWEN_CONFIG = ROOT / "tests" / "data" / "configs" / "Qwen3-8B-Base.json"
# The stage kinds that compute on the GPU they hold (builder.stages: heavy and coordinating).
COMPUTING_STAGES = ("score", "correct", "teach", "distill", "evaluate", "throughput")


def require_cuda() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"bench.gpu needs a CUDA GPU: torch {torch.__version__} sees none "
                         f"(built for CUDA {torch.version.cuda or 'none: a CPU build'}). Run it on a GPU "
                         "machine with a CUDA build of torch (and vllm for the throughput step).", file=sys.stderr)
        sys.exit(2)
    return torch.cuda.device_count()


def run_step(name: str, command: list[str], timeout_s: float, log_dir: Path) -> dict:
    """One step as a subprocess: exit code, wall time, the end of its log."""
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = time.perf_counter() - started
    tail = log_path.read_text(errors="replace")[-3000:]
    print(f"{name}: {'timed out' if code is None else f'exit {code}'} in {wall:.0f} s", flush=True)
    return {"command": command, "exit_code": code, "timed_out": code is None, "wall_s": round(wall, 1),
            "ok": code == 0, "log_tail": tail}


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


def stages_not_on_cuda(stages_dir: Path) -> tuple[dict[str, dict | None], list[str]]:
    """Each finished computing stage's recorded placement, and the ones that did not run on
    CUDA (or recorded nothing): every one of them held a GPU. A distillation of 0 tokens
    (pruning only) computes nothing and is left out."""
    placements: dict[str, dict | None] = {}
    for file in sorted(stages_dir.glob("*/manifest.json")):
        manifest = json.loads(file.read_text())
        summary = manifest.get("summary") or {}
        if manifest.get("stage") not in COMPUTING_STAGES or (manifest["stage"] == "distill" and not summary.get("steps")):
            continue
        placements[file.parent.name] = summary.get("placement")
    off_cuda = [stage for stage, placed in placements.items() if not (placed or {}).get("device", "").startswith("cuda")]
    for stage in off_cuda:
        print(f"rehearsal: stage {stage} did not run on CUDA: {placements[stage]}", flush=True)
    return placements, off_cuda


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
    steps = {"rehearsal": rehearsal_step(gpus, scratch / "runs", scratch, 240 if args.quick else 300)}
    steps["distill"] = run_step("distill", [sys.executable, "-m", "bench.distill", "--quick", "--device", "cuda"],
                                150 if args.quick else 180, scratch)
    if (RESULTS / "distill.json").exists() and steps["distill"]["ok"]:  # keep the CPU result where it was
        shutil.move(RESULTS / "distill.json", RESULTS / "distill-cuda.json")
        subprocess.run(["git", "checkout", "--", "bench/results/distill.json"], cwd=ROOT, check=False)
    steps["throughput"] = throughput_step(scratch, 90 if args.quick else 120, args.quick)
    steps["memory"] = run_step("memory", [sys.executable, "-m", "bench.memory", "--quick", "--device", "cuda"],
                               120 if args.quick else 180, scratch)
    ok = all(step["ok"] for step in steps.values())
    path = write_result("gpu", {"gpus": gpus, "quick": args.quick, "all_ok": ok, "steps": steps,
                                "host": machine()})
    print(f"{'all steps passed' if ok else 'some steps failed'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
