"""A Ray Train callback that gives back the CPUs and GPUs of a worker group whose start fails.

Ray Train 2.60 (the version pinned) makes a worker group's placement group, starts its
workers, then runs the callbacks that set them up, torch.distributed's process group among
them. When one of those fails (on a node that declares GPUs but has no CUDA: "Distributed
package doesn't have NCCL built in"), the controller never learns of the worker group and
never shuts it down: its placement group keeps its CPUs and GPUs until the build's driver
exits, and the next training stage waited for them, without a word, for the 600 s of
RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (issue 21).

Ray Train runs the callbacks named in RAY_TRAIN_CALLBACKS before its own, so this one hears
that the worker group is up before the process group's setup fails, and shuts it down
(its workers and its placement group) as the failure goes by. The runner names it there for
every stage (builder.running.runner.RAY_TRAIN_FIXES).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

log = logging.getLogger(__name__)


class ShutDownFailedStart(WorkerGroupCallback):
    def __init__(self):
        self._started = None  # the worker group whose start is under way, once it has workers

    @contextmanager
    def on_worker_group_start(self):
        """Wraps the whole start of a worker group."""
        self._started = None
        try:
            yield
        except BaseException:
            if self._started is not None:
                self._shut_down(self._started)
            raise
        finally:
            self._started = None

    def after_worker_group_start(self, worker_group) -> None:
        """Called first of the callbacks: the workers and the placement group exist."""
        self._started = worker_group

    @staticmethod
    def _shut_down(worker_group) -> None:
        try:
            worker_group.shutdown()
        except Exception:  # noqa: BLE001 (the start's own error is the one to report)
            log.exception("could not shut down the worker group whose start failed")
