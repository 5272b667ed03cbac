"""Distributed plumbing: one process, DDP or FSDP2, decided by torch.distributed."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from builder.options.run_options import Parallel
from builder.training.aligner import HiddenStateAligner
from builder.training.settings import TrainSettings
from builder.training.sharded import fully_shard_model

log = logging.getLogger(__name__)


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


def warn_if_bf16_is_emulated(settings: TrainSettings, device: torch.device) -> None:
    # A CPU without AVX-512 has no bf16 instructions: bf16 matmuls are emulated, far slower
    # than fp32.
    if settings.dtype == "bfloat16" and device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.startswith("AVX512"):
            log.warning("dtype='bfloat16' on a %s CPU runs far slower than float32; use float32", capability)


def wrap_for_distributed(
    model: torch.nn.Module, device: torch.device, world: World, parallel: Parallel,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """DDP, or FSDP2 (bf16 `compute_dtype`: with its mixed-precision policy) of a model
    already whole on this rank; builder.training.sharded loads FSDP2 models without that."""
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r} is not supported; use 'ddp' or 'fsdp'")
    if not world.distributed:  # one process, no process group: nothing to wrap
        return model
    if parallel == "fsdp":
        student = model.student if isinstance(model, HiddenStateAligner) else model
        return fully_shard_model(model, device, student.model.layers, compute_dtype)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def device_memory(device: torch.device) -> int:
    """Bytes of one device: the GPU's, or on a CPU the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def student_of(model: torch.nn.Module) -> torch.nn.Module:
    """The trained model, under DDP and the hidden-state aligner."""
    inner = unwrap(model)
    return inner.student if isinstance(inner, HiddenStateAligner) else inner
