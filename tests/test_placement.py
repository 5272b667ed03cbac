"""Every stage runs on the device it holds, in a dtype the hardware has (issue #21 point 1):
the one rule (builder.running.placement) with its probes injected, then a stage holding a
GPU that Ray assigned on this CPU-only machine, which must fail at once naming the node and
the cause instead of computing on the CPU."""
from __future__ import annotations

import dataclasses

import pytest

from builder.options.precision import choose_precision
from builder.running.placement import DeviceUnusable, Probes, combined, decide_placement


def never_called(*args):
    raise AssertionError("the decision did not need this probe")


CPU_ONLY = Probes(gpu_ids=lambda: [], cuda_version=never_called, cuda_available=never_called,
                  device_count=never_called, capability=never_called, gpu_name=never_called,
                  visible_devices=never_called, node=lambda: "box (10.0.0.1)")


def gpu_node(capability=(9, 0), ids=("0",), visible="0", count=1, cuda="12.4", available=True) -> Probes:
    return dataclasses.replace(CPU_ONLY, gpu_ids=lambda: list(ids), cuda_version=lambda: cuda,
                               cuda_available=lambda: available, device_count=lambda: count,
                               capability=lambda index: capability, gpu_name=lambda index: "NVIDIA H100",
                               visible_devices=lambda: visible)


def test_a_stage_without_a_gpu_computes_on_the_cpu_and_never_asks_cuda():
    placement = decide_placement(False, "bfloat16", CPU_ONLY)
    assert (placement.device, placement.dtype, placement.node) == ("cpu", "bfloat16", "box (10.0.0.1)")
    assert placement.facts() == {"node": "box (10.0.0.1)", "device": "cpu", "dtype": "bfloat16"}


@pytest.mark.parametrize("ids, visible, expected", [
    (["0"], "0", "cuda:0"),  # a heavy task: Ray shows it its own GPU only
    (["3"], "2,3", "cuda:1"),  # a Ray Train worker sees its node-mates' GPUs too
    (["1"], None, "cuda:1"),  # nothing hides devices: the id is the index
])
def test_a_stage_holding_a_usable_gpu_computes_on_that_gpu(ids, visible, expected):
    placement = decide_placement(False, "bfloat16", gpu_node(ids=ids, visible=visible, count=4))
    assert placement.device == expected and placement.dtype == "bfloat16"
    assert placement.gpu == "NVIDIA H100 (compute capability 9.0)"
    assert placement.facts()["device"] == expected and "peak_memory_bytes" in placement.facts()


def test_asking_for_a_gpu_outside_ray_takes_the_first():
    assert decide_placement(True, "float32", gpu_node(ids=())).device == "cuda:0"


@pytest.mark.parametrize("probes, cause", [
    (gpu_node(cuda=None), "torch is a CPU build (no CUDA)"),
    (gpu_node(available=False), "torch (built for CUDA 12.4) finds no GPU (no NVIDIA driver"),
    (gpu_node(ids=["1"], visible="0", count=1), "CUDA_VISIBLE_DEVICES='0' does not list it"),
    (gpu_node(ids=["1"], visible=None, count=1), "torch sees only 1 GPU(s) there, fewer than assigned"),
])
def test_a_gpu_it_cannot_use_fails_naming_the_node_and_the_cause(probes, cause):
    with pytest.raises(DeviceUnusable) as failure:
        decide_placement(True, "float32", probes)
    assert "node box (10.0.0.1) holds GPU" in str(failure.value) and cause in str(failure.value)


def test_bfloat16_on_a_gpu_without_it_is_refused_not_changed():
    """A V100 (7.0) or T4 (7.5) has no bf16; the dtype is hashed, so the stage refuses and says what to run."""
    with pytest.raises(DeviceUnusable, match=r"compute capability 7\.0\).*no bfloat16.*--precision float32"):
        decide_placement(True, "bfloat16", gpu_node(capability=(7, 0)))
    assert decide_placement(True, "float32", gpu_node(capability=(7, 0))).dtype == "float32"


@pytest.mark.parametrize("capability, expected", [
    (None, "bfloat16"),  # no GPU visible to the planner (a cluster's are elsewhere): stages check
    ((8, 0), "bfloat16"),
    ((9, 0), "bfloat16"),
    ((7, 0), "float32"),  # V100
    ((7, 5), "float32"),  # T4
])
def test_auto_precision_picks_bf16_only_on_gpus_that_have_it(capability, expected):
    choice = choose_precision("auto", True, never_called, never_called, lambda: capability)
    assert choice.dtype == expected and choice.reason.startswith("auto: ")


def test_a_stage_of_several_workers_records_every_node_and_the_highest_peak():
    first = {"node": "a", "device": "cuda:0", "dtype": "bfloat16", "gpu": "H100", "peak_memory_bytes": 5}
    merged = combined([first, first | {"node": "b", "peak_memory_bytes": 9}])
    assert merged["nodes"] == ["a", "b"] and merged["peak_memory_bytes"] == 9 and merged["workers"] == 2
    assert combined([]) is None


# -- real stages: the manifest records where a stage ran; a held GPU without CUDA fails first -----
from builder.options.run_options import RunOptions  # noqa: E402
from builder.stages.execute import execute_stage  # noqa: E402
from builder.store.stage_store import StageStore  # noqa: E402
from test_damaged_inputs import finish_data, finish_teacher, plan, stage  # noqa: E402,F401 (plan: a fixture)
from tiny_models import one_thread  # noqa: E402,F401 (autouse fixture)


def test_a_stage_on_the_cpu_records_node_device_and_dtype_in_its_manifest(plan, tmp_path):
    import socket

    store, options = StageStore(tmp_path), RunOptions(workdir=tmp_path, cpus_per_stage=1)
    inputs = {"teacher": finish_teacher(plan, store), "data": finish_data(plan, store)}
    scores = execute_stage(stage(plan, "score"), plan.spec, options, inputs)
    assert scores.summary["placement"] == {"node": socket.gethostname(), "device": "cpu", "dtype": "float32"}
    assert store.manifest(stage(plan, "score").key).summary["placement"]["device"] == "cpu"  # as written


def test_a_stage_holding_a_gpu_on_a_machine_without_cuda_fails_at_once(plan, tmp_path, monkeypatch):
    """Ray (one declared GPU, none real) assigns the score stage GPU 0; torch here is a CPU
    build. The stage fails before its model loads, naming the node and the cause, and
    leaves no manifest: nothing computed on the CPU in the GPU's place."""
    import ray
    from ray_instance import local_ray

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU: the stage would run on it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store, options = StageStore(tmp_path), RunOptions(workdir=tmp_path, cpus_per_stage=1, gpus_per_stage=1)
    inputs = {"teacher": finish_teacher(plan, store), "data": finish_data(plan, store)}
    score = stage(plan, "score")
    with local_ray(RunOptions(local_cpus=1), gpus=1):
        on_a_gpu = ray.remote(execute_stage).options(num_cpus=1, num_gpus=1)
        with pytest.raises(DeviceUnusable) as failure:
            ray.get(on_a_gpu.remote(score, plan.spec, options, inputs), timeout=300)
    message = str(failure.value)
    assert "node " in message and "(127.0.0.1) holds GPU 0 (assigned by Ray)" in message
    assert "torch is a CPU build (no CUDA)" in message
    assert store.manifest(score.key) is None


def test_a_rehearsal_on_gpus_gives_each_heavy_stage_a_fresh_worker(plan):
    """A reused worker would keep its CUDA context and the GPU it held first."""
    from builder.running import runner

    score = stage(plan, "score")
    assert runner._remote_for(score, RunOptions(rehearsal=True)) is runner._execute_light  # CPUs: reuse
    assert runner._remote_for(score, RunOptions(rehearsal=True, gpus_per_stage=1)) is runner._execute_heavy
