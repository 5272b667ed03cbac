"""Sizing stages to the cluster's nodes and checking the shared work dir (builder.options.cluster),
without Ray: nodes are given as `ray.nodes()` would list them."""
from __future__ import annotations

import pytest

from builder.options.cluster import (fit_in_cluster, fit_on_node, nodes_from_ray, read_probe, size_for_cluster,
                                     train_cpus_per_worker, workdir_problems, write_probe)
from builder.errors import SpecError
from builder.options.run_options import RunOptions


def ray_node(node_id: str, cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, "memory": 1e9} | ({"GPU": gpus} if gpus else {})
    return {"NodeID": node_id, "Alive": alive, "NodeManagerHostname": f"host-{node_id}",
            "NodeManagerAddress": "10.0.0.1", "Resources": resources}


TWO_SMALL = nodes_from_ray([ray_node("a", 1), ray_node("b", 1), ray_node("dead", 64, alive=False)])


def test_dead_nodes_are_left_out():
    assert [node.node_id for node in TWO_SMALL] == ["a", "b"]


def test_default_stage_cpus_come_from_the_largest_node_not_the_driver():
    """The hang of issue 12: a driver with many cores asked 1-CPU nodes for all of them."""
    sized = size_for_cluster(RunOptions(train_workers=2), TWO_SMALL, "test cluster")
    assert sized.stage_cpus() == 1 and train_cpus_per_worker(sized) == 1
    mixed = nodes_from_ray([ray_node("a", 4), ray_node("b", 16)])
    assert size_for_cluster(RunOptions(), mixed, "test cluster").stage_cpus() == 16


def test_explicit_cpus_are_kept_when_a_node_has_them():
    assert size_for_cluster(RunOptions(cpus_per_stage=1), TWO_SMALL, "c").stage_cpus() == 1


def problems(options: RunOptions, nodes=TWO_SMALL) -> dict:
    with pytest.raises(SpecError) as caught:
        size_for_cluster(options, nodes, "the Ray cluster at head:6379")
    assert "the Ray cluster at head:6379" in str(caught.value)
    return {problem.field: problem.message for problem in caught.value.problems}


def test_too_many_cpus_per_stage_names_the_flag():
    found = problems(RunOptions(cpus_per_stage=8))
    assert "lower --cpus-per-stage to at most 1" in found["--cpus-per-stage"]
    assert "host-a" in found["(cluster)"] and "host-b" in found["(cluster)"]


def test_gpus_that_no_node_has_name_the_flag():
    found = problems(RunOptions(gpus_per_stage=1))
    assert "lower --gpus-per-stage to at most 0" in found["--gpus-per-stage"]


def test_train_workers_must_fit_the_whole_cluster():
    found = problems(RunOptions(train_workers=3))
    assert "the cluster holds at most 2" in found["--train-workers"]
    # 4 CPUs shared by 2 workers: 2 CPUs each, which fit twice on a 5-CPU node, not three times.
    five = nodes_from_ray([ray_node("a", 5), ray_node("b", 5)])
    assert size_for_cluster(RunOptions(cpus_per_stage=4, train_workers=2), five, "c").stage_cpus() == 4
    assert "at most 10" in problems(RunOptions(cpus_per_stage=1, train_workers=11), five)["--train-workers"]


def test_gpu_workers_need_a_gpu_each():
    gpus = nodes_from_ray([ray_node("a", 8, gpus=2), ray_node("b", 8, gpus=1)])
    size_for_cluster(RunOptions(gpus_per_stage=1, train_workers=3, cpus_per_stage=3), gpus, "c")
    found = problems(RunOptions(gpus_per_stage=1, train_workers=4, cpus_per_stage=4), gpus)
    assert set(found) == {"--train-workers", "(cluster)"}
    assert "1 GPU each" in found["--train-workers"] and "at most 3" in found["--train-workers"]


def test_probe_is_read_back_as_written(tmp_path):
    probe = tmp_path / "probe"
    assert write_probe(str(probe), "abc") == "" and read_probe(str(probe), "abc") == ""
    assert "other content" in read_probe(str(probe), "xyz")
    assert "cannot read" in read_probe(str(tmp_path / "missing"), "abc")


def test_a_node_that_misses_the_workdir_names_it_and_the_fix(tmp_path):
    writer = TWO_SMALL[0]
    found = workdir_problems(tmp_path, writer, "", {"node b": "cannot read it: No such file", "the driver": ""})
    assert len(found) == 1 and found[0].field == "--workdir"
    assert found[0].message.startswith("node b does not see") and "host-a" in found[0].message
    assert "every node mounts at the same path" in found[0].message
    assert workdir_problems(tmp_path, writer, "", {"node b": ""}) == []
    unwritable = workdir_problems(tmp_path, writer, "cannot write it: Read-only file system", {})
    assert "Read-only" in unwritable[0].message


EIGHT_GPUS = nodes_from_ray([ray_node("gpu", 16, gpus=8)])


def test_with_gpus_a_heavy_stage_takes_one_gpus_share_of_the_cpus():
    """Issue 21: the whole node's CPUs per stage ran one GPU stage at a time on an 8-GPU node."""
    sized = size_for_cluster(RunOptions(gpus_per_stage=1), EIGHT_GPUS, "c")
    assert sized.stage_cpus() == 2 and fit_on_node(EIGHT_GPUS[0], sized.stage_cpus(), 1) == 8
    assert size_for_cluster(RunOptions(gpus_per_stage=2), EIGHT_GPUS, "c").stage_cpus() == 4
    assert size_for_cluster(RunOptions(), EIGHT_GPUS, "c").stage_cpus() == 16  # on CPUs: every core
    # Mixed nodes: the GPU node with the fewest CPUs per GPU sets it, so all GPUs stay busy;
    # a CPU-only node's cores do not count.
    mixed = nodes_from_ray([ray_node("a", 16, gpus=8), ray_node("b", 24, gpus=4), ray_node("cpu", 96)])
    assert size_for_cluster(RunOptions(gpus_per_stage=1), mixed, "c").stage_cpus() == 2
    assert size_for_cluster(RunOptions(gpus_per_stage=1, cpus_per_stage=6), mixed, "c").stage_cpus() == 6


def test_a_node_holds_what_fits_in_both_its_cpus_and_its_gpus():
    node = EIGHT_GPUS[0]
    assert fit_on_node(node, 16, 1) == 1  # one whole-node actor, however many GPUs
    assert fit_on_node(node, 1, 1) == 8 and fit_on_node(node, 3, 0) == 5
    assert fit_in_cluster([node, node], 2, 1) == 16


def test_a_gpu_stage_needs_its_cpus_on_a_gpu_node():
    """A 96-CPU node without GPUs does not make 32 CPUs per GPU stage fit."""
    mixed = nodes_from_ray([ray_node("a", 16, gpus=8), ray_node("cpu", 96)])
    found = problems(RunOptions(gpus_per_stage=1, cpus_per_stage=32), mixed)
    assert "no node has both" in found["--cpus-per-stage"] and "at most 16" in found["--cpus-per-stage"]
