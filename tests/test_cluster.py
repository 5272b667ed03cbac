"""Sizing stages to the cluster's nodes and checking the shared work dir (builder.options.cluster),
without Ray: nodes are given as `ray.nodes()` would list them."""
from __future__ import annotations

import pytest

from builder.options.cluster import (nodes_from_ray, read_probe, size_for_cluster, train_cpus_per_worker,
                             workdir_problems, write_probe)
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
