"""A local Ray instance for a test module, on loopback, started the way builds start it
(builder.running.ray_session.init_ray), with the variables init_ray sets restored afterwards.

An in-process build (builder.cli.main) that finds Ray connected runs on that instance and
leaves it up, so a module whose builds need no fresh instance pays Ray's start-up once
instead of once per build.

`gpus` declares GPUs this machine does not have (with `local_cpus`, CPUs too): Ray
schedules by what a node declares, so placement, concurrency and pools run as on a GPU node
(a task holding a "GPU" still has no CUDA).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import pytest
import ray

from builder.options.run_options import RunOptions
from builder.running import ray_session
from builder.running.ray_session import init_ray, shutdown_ray


@contextmanager
def local_ray(options: RunOptions = RunOptions(), gpus: int = 0):
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR"):
            patch.setenv(name, "")  # init_ray sets them; restored afterwards
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", True)
        if gpus:
            patch.setattr(ray_session, "_init_stoppable", functools.partial(ray_session._init_stoppable, num_gpus=gpus))
        init_ray(options)
        try:
            yield
        finally:
            shutdown_ray()  # stops the instance and removes its temp dir


def state_api_running() -> bool:
    """Whether the local instance this process started serves Ray's state API: its dashboard
    runs the state module, a process of its own (the instance's processes are this
    process's children). Without include_dashboard, dashboard.py still runs, with no modules."""
    import psutil

    def name(process) -> str:
        try:
            return process.name()
        except psutil.Error:  # gone meanwhile
            return ""

    return any(name(child).startswith("ray-dashboard-StateHead") for child in psutil.Process().children(recursive=True))
