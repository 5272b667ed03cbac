"""What bench.gpu's steps share: running one as a subprocess under a time limit, and reading
from a build's manifests where its computing stages ran (builder/running/placement.py)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench.common import ROOT

# The stage kinds that compute on the GPU they hold (builder.stages: heavy and coordinating).
COMPUTING_STAGES = ("score", "correct", "teach", "distill", "evaluate", "throughput")


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
        print(f"stage {stage} did not run on CUDA: {placements[stage]}", flush=True)
    return placements, off_cuda
