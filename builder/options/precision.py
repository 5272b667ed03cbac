"""What `--precision auto` trains in, decided once, in the planning process, before any
stage is hashed (the precision is part of the training stages' hashes, so the same spec
built on a GPU and on a CPU never shares a training stage).

    auto on a GPU  -> bfloat16 (autocast; tensor cores) where the GPU has it: compute
                      capability 8.0 or newer (A100, L40S, H100; T4 and V100 emulate it). The
                      GPUs this machine shows (nvidia-smi) decide; a driver that shows none (a
                      cluster's GPUs are on other nodes) plans bfloat16, and a stage placed on
                      an older GPU then refuses to run (builder.running.placement) and names
                      --precision float32, since the precision is hashed and never changed late
    auto on a CPU  -> bfloat16 only where the CPU has native bf16 instructions (avx512_bf16
                      or amx_bf16) AND a short matmul probe shows bf16 faster than float32
                      here; float32 elsewhere (CPUs without them emulate bf16, many times slower than float32)

`choose_precision` is the decision alone, with the CPU's flags and the probe injected, so
it is tested without depending on the machine that runs the tests.
"""
from __future__ import annotations

import functools
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PRECISIONS = ("float32", "bfloat16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_PROBE_SIZE = 512  # 512^3 multiply-adds: milliseconds where bf16 is native, so the probe stays short
_PROBE_REPEATS = 5
_PROBE_BUDGET_S = 0.3  # per precision: an emulated bf16 matmul stops the probe early
BF16_MIN_CAPABILITY = (8, 0)  # CUDA compute capability with bf16 tensor cores (Ampere)


@dataclass(frozen=True)
class Precision:
    dtype: str  # one of PRECISIONS: what training stages run in and are hashed with
    reason: str  # why, for the dry run

    def __str__(self) -> str:
        return f"{self.dtype} ({self.reason})"


def choose_precision(requested: str, use_gpu: bool, cpu_flags: Callable[[], frozenset[str]],
                     bf16_speedup: Callable[[], float],
                     gpu_capability: Callable[[], tuple[int, int] | None] = lambda: None) -> Precision:
    """The concrete precision for `--precision REQUESTED`. The flags and the probes are
    called only when the decision needs them (the matmul probe costs a few hundred ms).
    `gpu_capability`: the lowest compute capability of this machine's GPUs, None if it shows none."""
    if requested in PRECISIONS:
        return Precision(requested, f"--precision {requested}")
    if requested != "auto":
        raise ValueError(f"precision {requested!r} is not one of auto, {', '.join(PRECISIONS)}")
    if use_gpu:
        return _gpu_precision(gpu_capability())
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    if not native:
        return Precision("float32", "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16)")
    speedup = bf16_speedup()
    if speedup > 1.0:
        return Precision("bfloat16", f"auto: this CPU has {native[0]}; a bf16 matmul ran {speedup:.1f}x float32")
    return Precision("float32", f"auto: this CPU has {native[0]}, but a bf16 matmul ran only "
                                f"{speedup:.2f}x float32")


def _gpu_precision(capability: tuple[int, int] | None) -> Precision:
    if capability is None:
        return Precision("bfloat16", "auto: training on GPUs (none visible here; a stage on a GPU without bf16 "
                                     "refuses to run)")
    if capability >= BF16_MIN_CAPABILITY:
        return Precision("bfloat16", f"auto: training on GPUs with bf16 (compute capability "
                                     f"{capability_text(capability)})")
    return Precision("float32", f"auto: this machine's GPUs (compute capability {capability_text(capability)}) "
                                f"have no bf16, which needs {capability_text(BF16_MIN_CAPABILITY)}")


def capability_text(capability: tuple[int, int]) -> str:
    return ".".join(str(part) for part in capability)


def resolve_precision(requested: str, use_gpu: bool) -> Precision:
    """`choose_precision` on this machine: its /proc/cpuinfo flags, its GPUs and a timed matmul."""
    return choose_precision(requested, use_gpu, cpu_flags, bf16_speedup, gpu_capability)


def machine_signature(use_gpu: bool) -> str:
    """What `auto`'s decision depends on, as a short digest: GPU or not (and which compute
    capability), and the CPU's flags and model (a build on another kind of machine decides afresh)."""
    import hashlib

    text = f"gpu={use_gpu};model={cpu_model()};flags={' '.join(sorted(cpu_flags()))}"
    capability = gpu_capability() if use_gpu else None
    if capability is not None:  # absent on CPU machines: their signature is what it was
        text += f";cc={capability_text(capability)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux x86); empty where the file or its `flags` line is missing."""
    for line in _cpuinfo(cpuinfo).splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; empty where it does not say."""
    return next((line.partition(":")[2].strip() for line in _cpuinfo().splitlines()
                 if line.startswith("model name")), "")


def _nvidia_smi(field: str) -> list[str]:
    """One line per GPU of `nvidia-smi --query-gpu=FIELD`: the planning process must not load
    CUDA (a context holds GPU memory the stages need); [] where nvidia-smi is missing or fails."""
    try:
        shown = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in shown.splitlines() if line.strip()]


@functools.cache
def gpu_capability() -> tuple[int, int] | None:
    """The lowest compute capability of this machine's GPUs, from nvidia-smi; None where it
    shows no GPU, or nvidia-smi is missing or too old to say."""
    try:
        found = [tuple(int(part) for part in line.split(".")) for line in _nvidia_smi("compute_cap")]
    except ValueError:
        return None
    return min(found, default=None)


@functools.cache
def gpu_names() -> tuple[str, ...]:
    """This machine's GPUs by name (nvidia-smi), e.g. ("NVIDIA H100 80GB HBM3",); () where none shows."""
    return tuple(_nvidia_smi("name"))


@functools.cache
def bf16_speedup() -> float:
    """float32 time / bfloat16 time of one square matmul on this process's threads (> 1:
    bf16 is faster). Cached: one probe per process, so every stage of a plan sees the same answer."""
    import torch

    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    return _best_time(a) / _best_time(a.bfloat16())


def _best_time(a) -> float:
    """The fastest of a few timed a @ a (the first call, which sets up kernels, is not timed);
    stops early once the budget is spent, so an emulated bf16 cannot stretch the probe."""
    a @ a
    best, spent = float("inf"), 0.0
    for _ in range(_PROBE_REPEATS):
        started = time.perf_counter()
        a @ a
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
        if spent > _PROBE_BUDGET_S:
            break
    return best
