"""Runs a plan on Ray. Ray is imported here and in two runners of one kind of work each:
builder/training/ray_train.py (training on Ray Train) and builder/data/ray_data.py (tokenizing on Ray Data).

Each unfinished stage becomes one Ray task; upstream results travel as ObjectRefs, so Ray
starts a stage as soon as its inputs are done, and independent student branches run
concurrently when the cluster has room. Finished, intact stages (builder.planning.reuse) are not
submitted at all, so a build that is already complete never even starts Ray.

Each stage task holds the stage's lock while it runs (builder.store.stage_store), so two builds on one
work dir never run a stage twice at once: the second waits, then reuses the first's result.

A build stopped by SIGTERM (builder.running.interrupt) cancels the stages in flight; a local
instance is shut down and its temp dir removed however the build ends (short of SIGKILL).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from builder.running.interrupt import raise_if_stopped
from builder.running.ray_session import init_ray, shutdown_ray
from builder.options.cluster import (Node, new_probe, nodes_from_ray, read_probe, size_for_cluster, train_cpus_per_worker,
                                     trains_in_its_task, workdir_problems, write_probe)
from builder.errors import SpecError
from builder.options.run_options import RunOptions
from builder.planning.dag import Plan
from builder.stages.base import Stage
from builder.planning.reuse import Decision, check_inputs, decide
from builder.spec.schema import FamilySpec
from builder.stages.registry import stage_kind
from builder.store.stage_store import Manifest, StageStore
from builder.stages.execute import execute_stage
from builder.store.stage_log import captured_output, stage_log_path

log = logging.getLogger(__name__)

_STOP_POLL_S = 0.5  # how often the wait for stages looks for a SIGTERM (builder.running.interrupt) and
# the console (the observer's tick) for stages that started or progressed

# Ray Train settings for the stage processes that call TrainerV2.fit(); Ray Train passes
# them on to its controller and workers (ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE).
# A user's own setting wins. On a loaded machine the defaults print tracebacks that are not
# failures: the worker group's 60 s start timeout expires while workers import torch (the
# controller logs a traceback and retries), and the state actor's 10 s State API query
# times out (it logs a traceback and polls again; it only keeps the dashboard's run list).
RAY_TRAIN_QUIET = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
}
# A worker group whose start fails (torch.distributed's setup, say) is shut down, giving its
# CPUs and GPUs back: Ray Train 2.60 kept them until the driver exited, and the next training
# stage waited for them (builder/training/failed_start.py).
RAY_TRAIN_FIXES = {"RAY_TRAIN_CALLBACKS": "builder.training.failed_start.ShutDownFailedStart"}
# On a local instance (and in a rehearsal, whose training lasts a second or two): the
# preemption watcher (one more actor, so one more process to start per fit) has no node
# drain to wait for (the only node is this machine), and the controller's 2 s poll of its
# workers adds a second to each fit on average, more while they start; polling a few local
# workers every 0.5 s costs next to nothing.
RAY_TRAIN_LOCAL = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


@dataclass
class BuildResult:
    manifests: dict[str, Manifest] = field(default_factory=dict)  # stage id -> manifest
    failures: dict[str, str] = field(default_factory=dict)  # stage id -> error text
    optional_failures: dict[str, str] = field(default_factory=dict)  # same, for optional stage kinds
    reused: list[str] = field(default_factory=list)  # stage ids found finished on disk
    # stage id -> "skipped: upstream <id> failed", for stages that could not run (not failures)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


class BuildObserver:
    """What the runner tells whoever shows the build (builder.running.console); by default, nobody."""

    def queued(self, stage_id: str) -> None: ...
    def finished(self, stage_id: str, manifest: Manifest) -> None: ...
    def failed(self, stage_id: str, error: str) -> None: ...
    def tick(self) -> None: ...  # called about twice a second while stages run
    def ray_message(self, text: str) -> None:  # Ray's own message to the driver (e.g. an OOM kill)
        print(text, file=sys.stderr)


def run_plan(plan: Plan, options: RunOptions, rebuild: set[str] = frozenset(),
             observer: BuildObserver | None = None, disk_bytes: dict[str, float] | None = None) -> BuildResult:
    """Run every stage that is not finished and intact; `rebuild` holds stage ids to redo
    (what reads them is redone too). `observer` hears of each stage's progress. `disk_bytes`:
    stage id -> what its folder holds at its peak (the estimate's), checked free before it writes."""
    decisions = decide(plan, StageStore(options.workdir), rebuild)
    result = BuildResult()
    for stage_id, decision in decisions.items():
        if decision.reuse:
            result.manifests[stage_id] = decision.manifest
            result.reused.append(stage_id)
        elif decision.reason:
            log.warning("redo     %s: %s", stage_id, decision.reason)
    pending = [stage for stage_id, stage in plan.stages.items() if stage_id not in result.manifests]
    if not pending:
        return result
    raise_if_stopped()  # a SIGTERM during planning: do not even start Ray
    observer = observer or BuildObserver()
    connected = init_ray(options)
    try:
        options = fit_to_cluster(options)
        with _ray_messages_to(observer, enabled=not options.verbose):
            _run_pending(pending, decisions, plan.spec, options, result, observer, disk_bytes or {})
    finally:
        if connected:
            shutdown_ray()
    skip_downstream_of_failures(plan, result)
    return result


def fit_to_cluster(options: RunOptions) -> RunOptions:
    """Per-stage resources sized from the cluster's nodes (builder.options.cluster), and the work dir
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
    [write_error] = _get_stoppable([_on_node(writer, write_probe).remote(str(path), text)], timeout_s)
    if write_error:
        return workdir_problems(workdir, writer, write_error, {})
    reads = {f"node {node}": _on_node(node, read_probe).remote(str(path), text) for node in readers}
    errors = dict(zip(reads, _get_stoppable(list(reads.values()), timeout_s)))
    errors[f"the driver ({socket.gethostname()})"] = read_probe(str(path), text)
    path.unlink(missing_ok=True)
    return workdir_problems(workdir, writer, "", errors)


def _get_stoppable(refs: list[ray.ObjectRef], timeout_s: float) -> list:
    """ray.get(refs, timeout=timeout_s), acting on a SIGTERM while it waits (a plain ray.get
    holds the main thread until the results come)."""
    deadline = time.monotonic() + timeout_s
    waiting = refs
    while waiting and time.monotonic() < deadline:
        _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=_STOP_POLL_S)
        raise_if_stopped()
    return ray.get(refs, timeout=0 if waiting else None)  # Ray's GetTimeoutError when some are still out


def _on_node(node: Node, function):
    """`function` as a Ray task pinned to `node`, taking no CPU so a busy node still runs it."""
    strategy = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    return ray.remote(function).options(num_cpus=0, scheduling_strategy=strategy)


@contextmanager
def _ray_messages_to(observer: BuildObserver, enabled: bool):
    """Hand the messages Ray prints on the driver to the observer. The raylet pushes its
    errors (a worker killed for lack of memory and retried: 60 lines with a table of
    processes) to every driver, which prints them whatever log_to_driver says; Ray has no
    setting for it, so its printing function (Ray is pinned to 2.60) is swapped for the
    build's duration. With --verbose they print as Ray prints them."""
    original = ray._private.worker.print_to_stdstream
    if enabled:
        ray._private.worker.print_to_stdstream = lambda data, ignore_prefix=False: observer.ray_message(
            "\n".join(str(line) for line in data.get("lines", [])))
    try:
        yield
    finally:
        ray._private.worker.print_to_stdstream = original


def _run_pending(pending: list[Stage], decisions: dict[str, Decision], spec: FamilySpec, options: RunOptions,
                 result: BuildResult, observer: BuildObserver, disk_bytes: dict[str, float]) -> None:
    refs: dict[str, ray.ObjectRef] = {}
    train_env = ray_train_env(options)
    for stage in pending:  # plan order is dependency order
        upstream = [result.manifests.get(dep) or refs[dep] for dep in stage.inputs.values()]
        remote = _remote_for(stage, options).options(**_resources(stage, options), name=stage.id)
        refs[stage.id] = remote.remote(stage, spec, options, list(stage.inputs),
                                       decisions[stage.id], train_env, disk_bytes.get(stage.id, 0.0), *upstream)
        observer.queued(stage.id)
    try:
        _collect(refs, {stage.id: stage for stage in pending}, result, observer)
    except BaseException:  # SIGTERM (BuildStopped), Ctrl-C, or a bug here: stop what still runs
        _cancel([ref for stage_id, ref in refs.items() if stage_id not in result.manifests])
        raise


CANCEL_GRACE_S = 0.5  # how long a stopping build lets finishing stages deliver their results


def _cancel(refs: list[ray.ObjectRef]) -> None:
    """Stop the stages still queued or running: force kills their worker processes (their
    own children follow by their parent-death signal), recursive the tasks they started.
    A stage's manifest is written last and atomically, so a killed stage leaves no
    manifest, only what it can resume from."""
    # A stage whose reply is already on its way is left to finish: cancelling a task whose
    # result is arriving trips a check in Ray's core worker ("Tried to complete task that was
    # not pending"), which aborted a stopped build with exit code 1 instead of 143.
    _, refs = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S) if refs else ([], [])
    log.warning("stopping: cancelling %d unfinished stage(s)", len(refs))
    for ref in refs:
        try:
            ray.cancel(ref, force=True, recursive=True)
        except Exception as error:  # noqa: BLE001 (already finished, or its worker is gone)
            log.debug("cancel: %s", error)


def skip_downstream_of_failures(plan: Plan, result: BuildResult) -> None:
    """A stage whose input failed never ran: Ray hands it the upstream's error. Report it as
    skipped, naming the failed stage at the root, instead of as a failure of its own."""
    failed = set(result.failures) | set(result.optional_failures)
    roots: dict[str, str] = {}
    for stage_id, stage in plan.stages.items():  # dependency order: upstream roots are known
        for upstream in stage.inputs.values():
            root = roots.get(upstream) or (upstream if upstream in failed else None)
            if root is not None:
                roots[stage_id] = root
                break
    for stage_id, root in roots.items():
        result.failures.pop(stage_id, None)
        result.optional_failures.pop(stage_id, None)
        result.skipped[stage_id] = f"skipped: upstream {root} failed"


def _remote_for(stage: Stage, options: RunOptions):
    """A heavy stage gets a fresh worker process, so its model's memory goes back to the OS
    when it ends. A reused worker skips starting Python and importing torch,
    transformers and Ray Train again: a coordinating stage takes one (it loads no model), and
    so does every stage of a rehearsal on CPUs (its models are a few MB: no memory to return;
    on GPUs a reused worker would keep its CUDA context and the GPU it first held)."""
    fresh = _placed_as(stage, options) == "heavy" and (options.use_gpu or not options.rehearsal)
    return _execute_heavy if fresh else _execute_light


def _resources(stage: Stage, options: RunOptions) -> dict:
    """Heavy stages take the per-stage CPUs/GPUs (a fresh worker process: _remote_for); a
    training stage with one worker, which trains in its own task, takes what Ray Train gives
    a worker (train_cpus_per_worker, one GPU). Coordinating stages hand theirs to their Ray
    Train workers (correct, distill) or teacher actors (teach, builder/teaching/ray_pool.py),
    each a process of its own, so their task itself takes none; so does acquire-data (a
    light stage), to its Ray Data tokenizer actors (builder/data/ray_data.py)."""
    placed_as = _placed_as(stage, options)
    if placed_as != "heavy":
        return {"num_cpus": 0}
    if stage_kind(stage.name).resources == "training":
        return {"num_cpus": train_cpus_per_worker(options), "num_gpus": 1 if options.use_gpu else 0}
    return {"num_cpus": options.stage_cpus(), "num_gpus": options.gpus_per_stage}


def _placed_as(stage: Stage, options: RunOptions) -> str:
    """light, heavy or coordinating: a training stage trains in its own task with one
    worker (heavy), on Ray Train workers with more (builder.training.ray_train)."""
    resources = stage_kind(stage.name).resources
    if resources == "training":
        return "heavy" if trains_in_its_task(options.train_workers) else "coordinating"
    return resources


def _collect(refs: dict[str, ray.ObjectRef], stages: dict[str, Stage], result: BuildResult,
             observer: BuildObserver) -> None:
    by_ref = {ref: stage_id for stage_id, ref in refs.items()}
    waiting = list(by_ref)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=_STOP_POLL_S)
        raise_if_stopped()
        observer.tick()
        if not ready:
            continue
        stage_id = by_ref[ready[0]]
        try:
            manifest = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            optional = stage_kind(stages[stage_id].name).optional
            failures = result.optional_failures if optional else result.failures
            failures[stage_id] = _error_text(error)
            observer.failed(stage_id, failures[stage_id])
            waiting = _cancel_dependents(stage_id, refs, stages, waiting, observer)
            continue
        result.manifests[stage_id] = manifest
        observer.finished(stage_id, manifest)


def _cancel_dependents(failed: str, refs: dict[str, ray.ObjectRef], stages: dict[str, Stage],
                       waiting: list[ray.ObjectRef], observer: BuildObserver) -> list[ray.ObjectRef]:
    """Cancel the stages still waiting that read `failed`, directly or not; returns what is
    left to wait for. Ray hands a failed input's error on to a stage only once the stage got
    the CPUs and GPUs it asks for: after a distillation failed, its evaluation waited without
    a word for a GPU that other stages held (for ever, had no node one to give), only to fail
    at once. skip_downstream_of_failures reports them as skipped."""
    doomed = {refs[stage_id] for stage_id in downstream_of(failed, stages)} & set(waiting)
    for stage_id, ref in refs.items():  # plan order: the console marks each after its input
        if ref in doomed:
            with suppress(Exception):  # noqa: BLE001 (finished meanwhile: nothing to cancel)
                ray.cancel(ref)
            observer.failed(stage_id, f"skipped: upstream {failed} failed")
    if doomed:
        log.info("%s failed: %d stage(s) that read it are cancelled", failed, len(doomed))
    return [ref for ref in waiting if ref not in doomed]


def downstream_of(stage_id: str, stages: dict[str, Stage]) -> list[str]:
    """The stages among `stages` (in plan order) that read `stage_id`, directly or not."""
    found = {stage_id}
    for other_id, stage in stages.items():  # plan order: a stage's inputs come before it
        if found & set(stage.inputs.values()):
            found.add(other_id)
    return [other_id for other_id in stages if other_id in found - {stage_id}]


def _error_text(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(error)


def ray_train_env(options: RunOptions) -> dict[str, str]:
    """The Ray Train settings a stage sets before it trains; decided on the driver, which
    knows whether it runs on a local instance (a stage's worker cannot tell)."""
    local = not (options.address or os.environ.get("RAY_ADDRESS"))
    return RAY_TRAIN_QUIET | RAY_TRAIN_FIXES | (RAY_TRAIN_LOCAL if local or options.rehearsal else {})


def _execute(stage: Stage, spec: FamilySpec, options: RunOptions, roles: list[str],
             decision: Decision, train_env: dict[str, str], disk_bytes: float, *upstream: Manifest) -> Manifest:
    os.environ.update({k: v for k, v in train_env.items() if k not in os.environ})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    store, inputs = StageStore(options.workdir), dict(zip(roles, upstream))
    with store.locked(stage.id):  # another build running this stage: wait, then look again
        finished = store.reusable(stage.key, replaces=decision.replaces)
        if finished is not None:
            log.info("reused   %s: another build finished it", stage.id)
            return finished
        if decision.fresh or store.manifest(stage.key) is not None:  # stale or damaged: start over
            store.discard(stage.key)
        with _inputs_locked(store, inputs), _stage_log(store, stage, options):
            check_inputs(stage.id, inputs)
            node = {"hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
            return execute_stage(stage, spec, options, inputs, node=node, disk_bytes=disk_bytes)


@contextmanager
def _stage_log(store: StageStore, stage: Stage, options: RunOptions):
    """Everything the stage's process prints goes to its stage.log (see builder.store.stage_log),
    opened after a discard so the log is the one in the stage's folder; a failure's
    traceback is written there too, and the driver prints only its last line."""
    with captured_output(stage_log_path(store.path(stage.key)), tee=options.verbose):
        # Handlers bound to the captured stderr (a reused light worker had others before).
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
        try:
            yield
        except BaseException:
            with suppress(OSError):  # a full disk cannot take the traceback: the error itself still goes up
                traceback.print_exc()
            raise


@contextmanager
def _inputs_locked(store: StageStore, inputs: dict[str, Manifest]):
    """Shared locks on the stages read, so no other build replaces them mid-read. No deadlock:
    a task waits only on stages upstream of the one it holds, and the DAG has no cycles."""
    with ExitStack() as stack:
        for stage_id in sorted({manifest.stage_id for manifest in inputs.values()}):
            stack.enter_context(store.locked(stage_id, shared=True))
        yield



_execute_light = ray.remote(_execute)
# max_calls=1: the worker process exits after a heavy stage, returning the model's memory.
_execute_heavy = ray.remote(max_calls=1)(_execute)
