"""Runs a plan on Ray: the only module of the builder that imports Ray.

Each unfinished stage becomes one Ray task; upstream results travel as ObjectRefs, so Ray
starts a stage as soon as its inputs are done, and independent student branches run
concurrently when the cluster has room. Finished stages (manifest on disk) are not
submitted at all, so a build that is already complete never even starts Ray.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from builder.cluster import Node, new_probe, nodes_from_ray, read_probe, size_for_cluster, workdir_problems, write_probe
from builder.errors import SpecError
from builder.options import RunOptions
from builder.plan import Plan, Stage
from builder.spec import FamilySpec
from builder.store import Manifest, StageStore

log = logging.getLogger(__name__)

# A failure in these stages is recorded in the report; the rest of the family still builds.
OPTIONAL_STAGES = {"throughput"}


@dataclass
class BuildResult:
    manifests: dict[str, Manifest] = field(default_factory=dict)  # stage id -> manifest
    failures: dict[str, str] = field(default_factory=dict)  # stage id -> error text
    optional_failures: dict[str, str] = field(default_factory=dict)  # same, for OPTIONAL_STAGES
    reused: list[str] = field(default_factory=list)  # stage ids found finished on disk

    @property
    def ok(self) -> bool:
        return not self.failures


def init_ray(options: RunOptions) -> bool:
    """Connect to `--address`/RAY_ADDRESS, or start a local instance bound to loopback.
    Returns whether this call connected (and so should disconnect when done)."""
    address = options.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        _keep_on_loopback()
        # address="local" never attaches to a stale cluster left in the temp dir by a killed run.
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls
        # (without it, it logs a warning every second); on 127.0.0.1 only.
        ray.init(address="local", num_cpus=options.local_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=True)
    return True


def _keep_on_loopback() -> None:
    """A local instance serves this machine only. Ray 2.60 binds several gRPC servers to
    every interface even with node address 127.0.0.1, unless it runs in its single-machine
    mode (the one it uses on macOS/Windows): the variable reaches Ray's child processes,
    the constant this (already importing) process."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    # A temp dir of its own (short: it holds Unix sockets): Ray's state API, which Ray Train
    # polls from inside the cluster, finds "the" local cluster by its temp dir and fails
    # when another build or test runs one beside it.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="mz-ray-", dir="/tmp")


def run_plan(plan: Plan, options: RunOptions, spec_dir: Path) -> BuildResult:
    store = StageStore(options.workdir)
    result = BuildResult()
    for stage_id, stage in plan.stages.items():
        manifest = store.manifest(stage.key)
        if manifest is not None:
            result.manifests[stage_id] = manifest
            result.reused.append(stage_id)
    pending = [stage for stage_id, stage in plan.stages.items() if stage_id not in result.manifests]
    if not pending:
        return result
    connected = init_ray(options)
    try:
        options = fit_to_cluster(options)
        _run_pending(pending, plan.spec, options, spec_dir, result)
    finally:
        if connected:
            ray.shutdown()
    return result


def fit_to_cluster(options: RunOptions) -> RunOptions:
    """Per-stage resources sized from the cluster's nodes (builder.cluster), and the work dir
    checked on every node, before anything is submitted; raises SpecError naming the flag."""
    nodes = nodes_from_ray(ray.nodes())
    where = f"the Ray cluster at {options.address or os.environ.get('RAY_ADDRESS') or 'a local instance'}"
    sized = size_for_cluster(options, nodes, where)
    problems = _probe_workdir(options.workdir, nodes)
    if problems:
        raise SpecError(where, problems)
    log.info("cluster: %d node(s), %d CPUs per heavy stage; every node sees %s", len(nodes),
             sized.stage_cpus(), options.workdir)
    return sized


def _probe_workdir(workdir: Path, nodes: list[Node], timeout_s: float = 300.0) -> list:
    """One node's task writes a probe file into the work dir; every other node's task and
    the driver read it back."""
    path, text = new_probe(workdir)
    writer, readers = nodes[0], nodes[1:]
    write_error = ray.get(_on_node(writer, write_probe).remote(str(path), text), timeout=timeout_s)
    if write_error:
        return workdir_problems(workdir, writer, write_error, {})
    reads = {f"node {node}": _on_node(node, read_probe).remote(str(path), text) for node in readers}
    errors = {who: ray.get(ref, timeout=timeout_s) for who, ref in reads.items()}
    errors[f"the driver ({socket.gethostname()})"] = read_probe(str(path), text)
    path.unlink(missing_ok=True)
    return workdir_problems(workdir, writer, "", errors)


def _on_node(node: Node, function):
    """`function` as a Ray task pinned to `node`, taking no CPU so a busy node still runs it."""
    strategy = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    return ray.remote(function).options(num_cpus=0, scheduling_strategy=strategy)


def _run_pending(pending: list[Stage], spec: FamilySpec, options: RunOptions, spec_dir: Path,
                 result: BuildResult) -> None:
    refs: dict[str, ray.ObjectRef] = {}
    for stage in pending:  # plan order is dependency order
        upstream = [result.manifests.get(dep) or refs[dep] for dep in stage.inputs.values()]
        remote = (_execute_heavy if stage.heavy else _execute_light).options(**_resources(stage, options),
                                                                              name=stage.id)
        refs[stage.id] = remote.remote(stage, spec, options, str(spec_dir), list(stage.inputs), *upstream)
        log.info("queued   %s", stage.id)
    _collect(refs, {stage.id: stage for stage in pending}, result)


def _resources(stage: Stage, options: RunOptions) -> dict:
    """Heavy stages take the per-stage CPUs/GPUs and a fresh worker process (max_calls=1,
    so a model's memory is returned to the OS when the stage ends). Training stages hand
    their CPUs to their Ray Train workers, so the coordinating task itself takes none."""
    if not stage.heavy or stage.name in {"distill", "correct"}:
        return {"num_cpus": 0}
    return {"num_cpus": options.stage_cpus(), "num_gpus": options.gpus_per_stage}


def _collect(refs: dict[str, ray.ObjectRef], stages: dict[str, Stage], result: BuildResult) -> None:
    by_ref = {ref: stage_id for stage_id, ref in refs.items()}
    waiting = list(by_ref)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        stage_id = by_ref[ready[0]]
        try:
            manifest = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            optional = stages[stage_id].name in OPTIONAL_STAGES
            failures = result.optional_failures if optional else result.failures
            failures[stage_id] = _error_text(error)
            log.error("FAILED   %s: %s", stage_id, failures[stage_id].strip().splitlines()[-1])
            continue
        result.manifests[stage_id] = manifest
        log.info("finished %s in %.1f s", stage_id, manifest.wall_s)


def _error_text(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(error)


def _execute(stage: Stage, spec: FamilySpec, options: RunOptions, spec_dir: str, roles: list[str],
             *upstream: Manifest) -> Manifest:
    from builder.stages import execute_stage  # imported in the worker: torch loads there

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    node = {"hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
    return execute_stage(stage, spec, options, Path(spec_dir), dict(zip(roles, upstream)), node=node)



_execute_light = ray.remote(_execute)
# max_calls=1: the worker process exits after a heavy stage, returning the model's memory.
_execute_heavy = ray.remote(max_calls=1)(_execute)
