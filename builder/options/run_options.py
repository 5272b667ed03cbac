"""How to run a build (never what to build: that is the spec). Filled from CLI flags."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from builder.options.precision import Precision, resolve_precision


@dataclass(frozen=True)
class RunOptions:
    workdir: Path = Path("runs")
    address: str | None = None  # a Ray cluster; None starts a local one on 127.0.0.1
    # How long reaching `address` (or RAY_ADDRESS) may take before the build gives up naming
    # the cause (builder.running.ray_session): a healthy head answers in seconds.
    connect_timeout_s: float = 60.0
    cpus_per_stage: int = 0  # CPUs for each heavy stage; 0 = every CPU of the local machine
    gpus_per_stage: float = 0.0  # GPUs for each heavy stage (training, evaluation, vLLM)
    train_workers: int = 1  # Ray Train data-parallel workers per training stage
    parallel: str = "ddp"  # how those workers share the models: ddp (replicas) or fsdp (shards)
    local_cpus: int = 0  # CPUs for a local Ray instance; 0 = os.cpu_count()
    teacher_config: Path | None = None  # read the teacher's config here instead of its source
    precision: str = "auto"  # training autocast: auto, float32 or bfloat16 (see builder.options.precision)
    gpu: str = "h100"  # the accelerator the estimate (builder.planning.estimate) is for
    mfu: float = 0.4  # the model-FLOPs utilisation it assumes
    disk_gbps: float | None = None  # its disk bandwidth in GB/s; None: builder.planning.cost_model.Costs's
    rehearsal: bool = False  # a `--rehearse` build (builder.rehearse): its manifests say so
    verbose: bool = False  # stream every process's output to the console too (stage.log gets it anyway)

    def stage_cpus(self) -> int:
        return self.cpus_per_stage or self.local_cpus or os.cpu_count() or 1

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_stage > 0

    def resolved_precision(self) -> Precision:
        """`precision` made concrete for planning (auto probes this CPU once per process).
        Stages read the planned precision from their key, never from here: a Ray worker on
        another machine would resolve `auto` differently."""
        return resolve_precision(self.precision, self.use_gpu)

    def device(self) -> str:
        """Where a stage's own (non Ray Train) model work runs, evaluated inside the stage."""
        import torch

        return "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"
