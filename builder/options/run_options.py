"""How to run a build (never what to build: that is the spec): the one model of the run
options. Every field is a `build-family` flag, made from the field by builder.options.flags
(name, type, choices, default, help), so each default and help text is written here only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from builder.options.precision import Precision, resolve_precision

Gpu = Literal["h100", "h200", "a100", "l40s"]  # the keys of builder.planning.cost_model.ACCELERATORS
Parallel = Literal["ddp", "fsdp"]
RequestedPrecision = Literal["auto", "float32", "bfloat16"]  # auto or one of builder.options.precision.PRECISIONS

# Marks an option that status, report and publish take too, not only build: they read a
# finished run, so they need where it is, the teacher config it was planned with and its
# precision.
EVERY_COMMAND = {"every_command": True}


def _flag(name: str) -> dict:
    """Marks an option whose flag is not --FIELD-NAME."""
    return {"flag": name}


def _whole_gpus(gpus: float) -> float:
    """Two stages sharing one GPU would each start a vLLM engine (or a model) sized for the
    whole of it (vLLM takes gpu_memory_utilization of the device's memory, 0.9 by default,
    whatever Ray reserved), and both fail or thrash; so a stage holds whole GPUs."""
    if gpus < 0 or gpus != int(gpus):
        raise ValueError("a stage holds whole GPUs (two stages sharing one would each size vLLM and its "
                         "model for all of its memory); give a whole number: 1 runs one heavy stage per GPU, "
                         "side by side, 0 runs on CPUs")
    return gpus


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Resolved once, here: stages in other processes (Ray workers, with another working
    # directory) read the same run directory.
    workdir: Annotated[Path, AfterValidator(Path.resolve)] = Field(
        Path("runs"), validate_default=True, description="run directory", json_schema_extra=EVERY_COMMAND)
    teacher_config: Path | None = Field(
        None, description="the teacher's config.json, to plan without fetching the teacher",
        json_schema_extra=EVERY_COMMAND)
    precision: RequestedPrecision = Field(
        "auto", description="training autocast, part of the training stages' hash (auto: bfloat16 on GPUs and on "
        "CPUs with native bf16 where a probe shows it faster, else float32; report, status and publish: the build "
        "the family view describes)", json_schema_extra=EVERY_COMMAND)
    verbose: bool = Field(
        False, description="also print every process's output (Ray, transformers, lm-eval, vLLM) and the whole "
        "plan; without it they go to each stage's stage.log only")
    gpu: Gpu = Field("h100", description="the accelerator --dry-run estimates time and memory for (bf16 peak, "
                     "memory)")
    mfu: float = Field(0.4, description="model-FLOPs utilisation the estimate assumes; 0.4 is what well-tuned "
                       "dense training reaches on H100s, inference stages reach less")
    disk_gbps: float | None = Field(
        None, description="disk bandwidth in GB/s per worker the estimate assumes for loading models and writing "
        "checkpoints (default: printed in the dry run's notes)")
    rehearsal: bool = Field(
        False, description="run the whole plan on a small random model of the teacher's architecture with tiny "
        "budgets, on a CPU in minutes, in WORKDIR/rehearsal/ (labelled a rehearsal: builder.rehearse)",
        json_schema_extra=_flag("--rehearse"))
    address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, else a local "
                                "instance)")
    # A healthy head answers in seconds (builder.running.cluster_address probes it first).
    connect_timeout_s: float = Field(
        60.0, gt=0, description="how long reaching --address (or RAY_ADDRESS) may take before the build stops "
        "naming the cause: nothing listening, no answer, a refused auth token", json_schema_extra=_flag("--connect-timeout"))
    cpus_per_stage: int = Field(
        0, description="CPUs per heavy stage; 0: the largest node's CPUs, or with --gpus-per-stage the CPUs that go "
        "with that many GPUs on a GPU node (16 CPUs, 8 GPUs: 2), so every GPU runs a stage at once")
    gpus_per_stage: Annotated[float, AfterValidator(_whole_gpus)] = Field(
        0.0, description="GPUs per heavy stage (scoring, evaluation, vLLM), a whole number; with GPUs, each "
        "training worker and teacher actor holds one")
    train_workers: int = Field(
        1, description="Ray Train workers per training stage (1: the stage trains in its own task, without a Ray "
        "Train group); they split the spec's global_batch_size (it must "
        "divide it): the same steps over the same data, summed in another order, whose rounding stays small in "
        "float32 and shows in bfloat16 weights; not in the stage hash, and the report says which layout made the "
        "weights")
    parallel: Parallel = Field(
        "ddp", description="how training workers share the models: ddp (a full replica each) or fsdp (FSDP2 "
        "shards parameters, gradients and optimizer state across workers, for models that do not fit one device)")
    # Execution only, like the worker count: recomputing a layer's forward in the backward
    # gives the same gradients (tests/test_distill.py), so it is not in any stage's hash.
    activation_checkpointing: bool = Field(
        False, description="training keeps only each decoder layer's input and recomputes the layer in the "
        "backward pass: activations take about 1/10 of the memory for about 1/3 more compute (the estimate "
        "counts it; --dry-run says which flags fit); not in the stage hash")
    local_cpus: int = Field(0, description="CPUs of the local Ray instance started without --address; 0: every "
                            "CPU of this machine")

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
