"""Where a stage's model work runs and in which dtype, decided in one place from what Ray
gave the process (issue #21, point 1). Every stage that computes asks it before it loads a
model: score, evaluate (perplexity included) and throughput in their Ray task, teach in each
teacher actor, correct and distill in each Ray Train worker.

    placement = place(asks_gpu=ctx.options.use_gpu, dtype="float32")  # raises DeviceUnusable
    model = load_model(model_dir, placement.device, ...)
    summary["placement"] = placement.facts()  # node, device, GPU, dtype, peak GPU memory

The rule, `decide_placement`:
  holds no GPU                    -> "cpu" (CUDA is never touched: no context on a GPU machine)
  holds a GPU, CUDA usable        -> "cuda:I", I the index of its first assigned GPU among the
                                     devices this process sees (Ray Train shows a worker its
                                     node-mates' GPUs too, so I is not always 0)
  holds a GPU, CUDA not usable    -> DeviceUnusable naming the node and the cause; never the
                                     CPU: a silent fallback turns a GPU hour into a CPU day
  bfloat16 on a GPU below compute capability 8.0 (T4, V100)
                                  -> DeviceUnusable: the dtype is planned and hashed
                                     (builder.options.precision), so it is never changed here

It lives with the runner because it reads Ray's assignment (`ray.get_gpu_ids()`, only when
this process already runs Ray, so benchmarks and in-process callers need not load it) and
reports where the work ran, as the runner reports the node of each task. The probes are
injectable, so the rule is tested on a CPU.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable

from builder.options.precision import BF16_MIN_CAPABILITY, capability_text


class DeviceUnusable(RuntimeError):
    """A stage holds a GPU it cannot use, or its planned dtype does not run there."""


@dataclass(frozen=True)
class Probes:
    """What the decision reads about this process; each called only when the decision needs it."""

    gpu_ids: Callable[[], list[str]]  # the GPU ids Ray assigned to this task, actor or worker
    cuda_version: Callable[[], str | None]  # the CUDA torch was built for; None: a CPU build
    cuda_available: Callable[[], bool]
    device_count: Callable[[], int]
    capability: Callable[[int], tuple[int, int]]
    gpu_name: Callable[[int], str]
    visible_devices: Callable[[], str | None]  # CUDA_VISIBLE_DEVICES, None when unset
    node: Callable[[], str]  # "hostname (IP)"

    @classmethod
    def of_this_process(cls) -> Probes:
        return cls(gpu_ids=_ray_gpu_ids, cuda_version=_torch_cuda_version, cuda_available=_cuda_available,
                   device_count=_device_count, capability=_capability, gpu_name=_gpu_name,
                   visible_devices=lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), node=node_name)


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:I": what torch.device() takes
    dtype: str  # what the stage computes in (builder.options.precision.PRECISIONS, or vLLM's dtype)
    node: str  # "hostname (IP)"
    gpu: str | None = None  # the GPU's name and compute capability, on CUDA
    peak_memory: Callable[[str], int | None] = field(default=lambda device: None, repr=False, compare=False)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def facts(self) -> dict:
        """For the stage's manifest: where it ran, in what, and (on CUDA) the most GPU memory
        its tensors held so far; facts about the run, never part of its hash."""
        facts = {"node": self.node, "device": self.device, "dtype": self.dtype}
        if self.on_cuda:
            facts |= {"gpu": self.gpu, "peak_memory_bytes": self.peak_memory(self.device)}
        return facts


def place(asks_gpu: bool, dtype: str, probes: Probes | None = None, computes_here: bool = True) -> Placement:
    """This process's placement (see the module docstring). Where it computes on CUDA itself,
    its device is made current and its peak-memory counter starts from zero (a reused worker
    ran others before); `computes_here=False` (vLLM, which computes in processes of its own)
    leaves both alone and records no peak."""
    placement = decide_placement(asks_gpu, dtype, probes or Probes.of_this_process())
    if placement.on_cuda and computes_here and probes is None:
        import torch  # only a process that holds a GPU: a CPU stage never touches CUDA

        torch.cuda.set_device(placement.device)
        torch.cuda.reset_peak_memory_stats(placement.device)
        return Placement(placement.device, placement.dtype, placement.node, placement.gpu, _peak_memory)
    return placement


def decide_placement(asks_gpu: bool, dtype: str, probes: Probes) -> Placement:
    """The rule alone: `asks_gpu` is what the stage reserved (its --gpus-per-stage, a teach
    actor's or Ray Train worker's GPU); Ray's assigned ids, where it gave any, say which."""
    assigned = probes.gpu_ids()
    if not (asks_gpu or assigned):
        return Placement("cpu", dtype, probes.node())
    index = _usable_index(assigned or ["0"], probes)
    capability = probes.capability(index)
    gpu = f"{probes.gpu_name(index)} (compute capability {capability_text(capability)})"
    if dtype == "bfloat16" and capability < BF16_MIN_CAPABILITY:
        raise DeviceUnusable(
            f"node {probes.node()}: GPU {index} is {gpu}, which has no bfloat16 (it needs compute capability "
            f"{capability_text(BF16_MIN_CAPABILITY)} or newer); this stage was planned in bfloat16, which is part "
            "of its hash: rebuild with --precision float32")
    return Placement(f"cuda:{index}", dtype, probes.node(), gpu)


def _usable_index(assigned: list[str], probes: Probes) -> int:
    """The torch index of the first assigned GPU, or DeviceUnusable saying why there is none."""
    where = f"node {probes.node()} holds GPU {', '.join(assigned)} (assigned by Ray), but"
    built_for = probes.cuda_version()
    if built_for is None:
        raise DeviceUnusable(f"{where} torch is a CPU build (no CUDA): install a CUDA build of torch on that node")
    visible = probes.visible_devices()
    if not probes.cuda_available():
        raise DeviceUnusable(f"{where} CUDA is not usable there: torch (built for CUDA {built_for}) finds no GPU "
                             f"(no NVIDIA driver, or one too old for CUDA {built_for}; "
                             f"CUDA_VISIBLE_DEVICES={visible!r})")
    ids = [part.strip() for part in visible.split(",")] if visible else None
    first = assigned[0]
    if ids is not None and first not in ids:
        raise DeviceUnusable(f"{where} CUDA_VISIBLE_DEVICES={visible!r} does not list it")
    index = ids.index(first) if ids is not None else int(first)
    count = probes.device_count()
    if index >= count:
        raise DeviceUnusable(f"{where} torch sees only {count} GPU(s) there, fewer than assigned "
                             f"(CUDA_VISIBLE_DEVICES={visible!r})")
    return index


def combined(facts: list[dict]) -> dict | None:
    """One stage's placement from its workers' (Ray Train ranks, teacher actors): the first
    worker's node, device and dtype, every node, and the highest peak of any worker."""
    if not facts:
        return None
    nodes = sorted({worker["node"] for worker in facts})
    peaks = [worker["peak_memory_bytes"] for worker in facts if worker.get("peak_memory_bytes") is not None]
    merged = facts[0] | {"workers": len(facts), "nodes": nodes}
    if peaks:
        merged["peak_memory_bytes"] = max(peaks)
    return merged


def node_name() -> str:
    """This machine as a report names it: hostname and, inside Ray, the node's IP."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    return socket.gethostname()


# -- this process's probes: torch is imported by the probes a GPU-holding stage calls ---------
def _ray_gpu_ids() -> list[str]:
    ray = sys.modules.get("ray")  # a process Ray started has loaded it; any other holds no Ray GPU
    if ray is None or not ray.is_initialized():
        return []
    return [str(gpu) for gpu in ray.get_gpu_ids()]


def _torch_cuda_version() -> str | None:
    import torch  # the probes run in a stage that holds a GPU; the CLI never calls them

    return torch.version.cuda


def _cuda_available() -> bool:
    import torch  # see _torch_cuda_version

    return torch.cuda.is_available()


def _device_count() -> int:
    import torch  # see _torch_cuda_version

    return torch.cuda.device_count()


def _capability(index: int) -> tuple[int, int]:
    import torch  # see _torch_cuda_version

    return tuple(torch.cuda.get_device_capability(index))


def _gpu_name(index: int) -> str:
    import torch  # see _torch_cuda_version

    return torch.cuda.get_device_name(index)


def _peak_memory(device: str) -> int:
    import torch  # see _torch_cuda_version

    return int(torch.cuda.max_memory_allocated(device))
