"""builder.training.failed_start: a worker group whose start fails after its workers exist
(torch.distributed's setup on a node without CUDA) is shut down, giving back its placement
group's CPUs and GPUs; Ray Train 2.60 kept them, and the next training stage waited
(issue 21). The callback is driven here as Ray Train's WorkerGroup.start drives it."""
from __future__ import annotations

import pytest

from builder.running.runner import ray_train_env
from builder.options.run_options import RunOptions
from builder.training.failed_start import ShutDownFailedStart


class WorkerGroup:
    shut_down = 0

    def shutdown(self):
        self.shut_down += 1


def start(callback: ShutDownFailedStart, group: WorkerGroup, fails_after_workers: bool, fails_before: bool = False):
    """What ray.train.v2's WorkerGroup.start does around its callbacks."""
    with callback.on_worker_group_start():
        if fails_before:  # e.g. the placement group's wait timed out: Ray Train cleans that up itself
            raise TimeoutError("placement group not ready")
        callback.after_worker_group_start(group)  # ours runs first (RAY_TRAIN_CALLBACKS)
        if fails_after_workers:  # Ray Train's BackendSetupCallback, next
            raise RuntimeError("Distributed package doesn't have NCCL built in")


def test_a_start_that_fails_once_workers_exist_shuts_the_group_down():
    callback, group = ShutDownFailedStart(), WorkerGroup()
    with pytest.raises(RuntimeError, match="NCCL"):
        start(callback, group, fails_after_workers=True)
    assert group.shut_down == 1


def test_a_start_that_works_or_fails_earlier_is_left_alone():
    callback, group = ShutDownFailedStart(), WorkerGroup()
    start(callback, group, fails_after_workers=False)
    with pytest.raises(TimeoutError):
        start(callback, WorkerGroup(), fails_after_workers=False, fails_before=True)
    assert group.shut_down == 0  # the earlier, started group is not the failed one


def test_every_stage_names_the_callback_to_ray_train():
    name = ray_train_env(RunOptions())["RAY_TRAIN_CALLBACKS"]
    module, cls = name.rsplit(".", 1)
    assert (module, cls) == (ShutDownFailedStart.__module__, ShutDownFailedStart.__name__)
