"""Run one planned stage where the runner placed it: its kind's function, then its manifest,
with the free space its outputs need checked first (builder.store.disk_space)."""
from __future__ import annotations

import logging
import time

from builder.options.run_options import RunOptions
from builder.spec.schema import FamilySpec
from builder.stages.base import Stage, StageContext
from builder.stages.registry import stage_kind
from builder.store.disk_space import space_checked
from builder.store.stage_store import Manifest, StageStore

log = logging.getLogger(__name__)


def execute_stage(stage: Stage, spec: FamilySpec, options: RunOptions, inputs: dict[str, Manifest],
                  node: dict | None = None, disk_bytes: float = 0.0) -> Manifest:
    """`disk_bytes`: what the stage's folder holds at its peak (the estimate's `Disk.peak`),
    checked free before it writes; a disk that fills anyway fails it with one DiskFull message."""
    store = StageStore(options.workdir)
    kind = stage_kind(stage.name)
    if kind.resources == "heavy":  # the CPUs the runner reserved for it (builder.running.runner._resources)
        import torch  # only heavy stages compute in this process

        torch.set_num_threads(options.stage_cpus())
    ctx = StageContext(stage, spec, options, store.prepare(stage.key), inputs)
    with space_checked(ctx.out_dir, disk_bytes, f"stage {stage.id}"):
        log.info("started  %s", stage.id)
        started = time.perf_counter()
        summary, tokens = kind.run(ctx)
        if node is not None:  # where it ran (hostname, Ray node id): the runner says
            summary["node"] = node
        if options.rehearsal:  # never to be mistaken for, or reused as, a real result
            summary["rehearsal"] = True
        # The manifest is written last: from here on the stage counts as finished.
        return store.finish(stage.key, time.perf_counter() - started, tokens, summary, list(inputs.values()))
