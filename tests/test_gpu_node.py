"""Scheduling on a GPU node, without a GPU (issue 21, point 3). Ray trusts the resources a
node declares, so a local instance whose node declares 16 CPUs and 8 GPUs exercises the
placement the runner asks for: a heavy stage's default CPUs (16 / 8 = 2), eight GPU stages
running side by side, an actor pool that finishes when fewer actors can start than it
asked for, and a build that ends at once when a stage fails there, skipping what reads it.
No task here touches CUDA (a "GPU" here is only a Ray resource).

The functions and classes that run on Ray's workers travel by value: workers cannot import
this module.

Run: .venv/bin/pytest tests/test_gpu_node.py -q   (about half a minute, most of it Ray starting)
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray
from ray import cloudpickle

from builder.options.cluster import fit_in_cluster, nodes_from_ray, train_cpus_per_worker
from builder.options.run_options import RunOptions
from builder.running.runner import BuildObserver, BuildResult, _collect, _resources, fit_to_cluster
from builder.stages.base import Stage
from builder.store.stage_store import StageKey
from builder.teaching.ray_pool import map_on_started_actors
from ray_instance import local_ray

CPUS, GPUS = 16, 8
NCCL = "RuntimeError: Distributed package doesn't have NCCL built in"  # the failure seen in issue 21


@pytest.fixture(scope="module")
def gpu_node():
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with local_ray(RunOptions(local_cpus=CPUS), gpus=GPUS):
            yield
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def stage(name: str, **inputs: str) -> Stage:
    return Stage(StageKey(name, "tiny", {}), inputs=inputs)


@pytest.fixture
def sized(gpu_node, tmp_path) -> RunOptions:
    """--gpus-per-stage 1 sized by the runner, as a build sizes it."""
    return fit_to_cluster(RunOptions(gpus_per_stage=1, workdir=tmp_path))


def test_the_node_declares_more_than_this_machine_has(gpu_node):
    [node] = nodes_from_ray(ray.nodes())
    assert (node.cpus, node.gpus) == (CPUS, GPUS)


def test_an_instance_for_one_training_worker_runs_no_dashboard(gpu_node):
    """No Ray Train group will ask its state API (builder.training.ray_train)."""
    from ray_instance import state_api_running

    assert not state_api_running()


def test_a_heavy_stage_takes_one_gpus_share_of_the_node(sized):
    assert sized.stage_cpus() == CPUS // GPUS == 2
    assert _resources(stage("evaluate"), sized) == {"num_cpus": 2, "num_gpus": 1}
    # One training worker trains in the stage's own task, holding what Ray Train gives a
    # worker; with more, its Ray Train workers hold them and its task nothing.
    assert _resources(stage("distill"), sized) == {"num_cpus": 2, "num_gpus": 1}
    assert _resources(stage("distill"), sized.model_copy(update={"train_workers": 4})) == {"num_cpus": 0}
    assert _resources(stage("teach"), sized) == {"num_cpus": 0}  # its teacher actors hold them


def _meet(folder: str, count: int, timeout_s: float) -> tuple[int, list]:
    """Runs as a stage would: marks itself started, then waits for `count` marks (at most
    `timeout_s`): it sees them all only if that many run at once."""
    Path(folder, uuid.uuid4().hex).touch()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(folder)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(os.listdir(folder)), ray.get_gpu_ids()


@pytest.mark.timeout(180)
def test_eight_gpu_stages_run_side_by_side(sized, tmp_path):
    """Before, each heavy stage held all 16 CPUs: one ran, 7 GPUs idled."""
    marks = tmp_path / "marks"
    marks.mkdir()
    task = ray.remote(_meet).options(**_resources(stage("evaluate"), sized))
    met = ray.get([task.remote(str(marks), GPUS, 90.0) for _ in range(GPUS)])
    assert [seen for seen, _ in met] == [GPUS] * GPUS
    assert sorted(gpu for _, gpus in met for gpu in gpus) == list(range(GPUS))  # a GPU each


def test_teacher_actors_are_counted_by_cpus_and_gpus_node_by_node(sized):
    nodes = nodes_from_ray(ray.nodes())
    assert fit_in_cluster(nodes, train_cpus_per_worker(sized), 1) == GPUS  # 2 CPUs and a GPU each
    # The hang of issue 21: actors of the whole node's CPUs, counted as one per GPU (8), of
    # which one could start.
    whole_node = sized.model_copy(update={"cpus_per_stage": CPUS})
    assert fit_in_cluster(nodes, train_cpus_per_worker(whole_node), 1) == 1


class Teacher:
    """A stand-in for builder.teaching.teach_pass.ShardTeacher: loads nothing."""

    def __init__(self, fails: bool = False):
        if fails:  # a teacher that does not load, say on a GPU whose CUDA is unusable
            raise RuntimeError("CUDA unusable")

    def teach(self, shard: int, meet: str | None = None) -> tuple[int, int]:
        if meet:  # the first shard waits until two actors teach at once
            _meet(meet, 2, 60.0)
        return shard, os.getpid()


def _teach_all(actors: list, shards: int, meet: Path | None = None) -> list[tuple[int, int]]:
    def teach(actor, shard: int):
        return actor.teach.remote(shard, str(meet) if meet and shard < 2 else None)

    try:
        return list(map_on_started_actors(actors, range(shards), teach))
    finally:
        for actor in actors:
            ray.kill(actor)


@pytest.mark.timeout(120)
def test_started_actors_share_the_shards(gpu_node, tmp_path):
    """Each free, started actor takes the next shard: the first two shards wait until they
    run at once, which they can only if two actors took one each."""
    actor = ray.remote(Teacher).options(num_cpus=2, num_gpus=1)
    taught = _teach_all([actor.remote() for _ in range(2)], shards=6, meet=tmp_path)
    assert sorted(shard for shard, _ in taught) == list(range(6))
    assert len({pid for _, pid in taught}) == 2


@pytest.mark.timeout(120)
def test_a_pool_finishes_on_the_actors_that_start(gpu_node):
    """Three actors of the whole node: one starts, two wait for room that never comes. Ray's
    ActorPool handed them shards too, and the pass waited for ever."""
    actor = ray.remote(Teacher).options(num_cpus=CPUS, num_gpus=1)
    taught = _teach_all([actor.remote() for _ in range(3)], shards=6)
    assert sorted(shard for shard, _ in taught) == list(range(6))
    assert len({pid for _, pid in taught}) == 1


@pytest.mark.timeout(120)
def test_an_actor_that_fails_to_start_is_left_out(gpu_node):
    actor = ray.remote(Teacher).options(num_cpus=1, num_gpus=1)
    taught = _teach_all([actor.remote(fails=True), actor.remote(), actor.remote(fails=True)], shards=4)
    assert sorted(shard for shard, _ in taught) == list(range(4))
    with pytest.raises(RuntimeError, match="(?s)none of the 2 actors started: .*CUDA unusable"):
        _teach_all([actor.remote(fails=True) for _ in range(2)], shards=4)


def _fail(*upstream):
    raise RuntimeError(NCCL.split(": ", 1)[1])


def _done(*upstream, seconds: float = 0.0) -> str:
    time.sleep(seconds)
    return "manifest"


class Heard(BuildObserver):
    def __init__(self):
        self.failures: dict[str, str] = {}

    def failed(self, stage_id: str, error: str) -> None:
        self.failures[stage_id] = error


@pytest.mark.timeout(120)
def test_a_failed_stage_ends_the_build_at_once_and_skips_what_reads_it(sized):
    """Issue 21: distill failed on a node of declared GPUs, and the build sat silent. Ray hands
    a failed input's error on only once the reading stage has its GPU; here every GPU is held
    (by another build, say) for minutes, so the evaluation that reads the failed distillation
    is cancelled rather than waited for, while an independent stage still runs."""
    hog = ray.remote(num_cpus=0, num_gpus=GPUS)(_done).remote(seconds=300)
    while ray.available_resources().get("GPU", 0):
        time.sleep(0.1)
    distill = stage("distill")
    evaluate, score = stage("evaluate", student=distill.id), stage("score")
    refs = {distill.id: ray.remote(num_cpus=0)(_fail).remote()}
    refs[evaluate.id] = ray.remote(_done).options(**_resources(evaluate, sized)).remote(refs[distill.id])
    refs[score.id] = ray.remote(_done).options(num_cpus=sized.stage_cpus()).remote()
    result, heard = BuildResult(), Heard()
    started = time.monotonic()
    try:
        _collect(refs, {s.id: s for s in (distill, evaluate, score)}, result, heard)
    finally:
        ray.cancel(hog, force=True)
    assert time.monotonic() - started < 30  # not the 300 s the GPUs are held
    assert result.failures == {distill.id: NCCL} and heard.failures[distill.id] == NCCL
    assert heard.failures[evaluate.id] == f"skipped: upstream {distill.id} failed"
    assert result.manifests == {score.id: "manifest"}
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(refs[evaluate.id], timeout=10)
