"""bench.suite's bookkeeping: which kind a process is, which xdist scope a test belongs to,
and the sampler counting a child's CPU time (the benchmark itself runs the whole suite)."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil

from bench.suite import CpuSampler, kind_of, kind_of_process, process_name, scope_of, seconds_per_scope


def test_processes_are_sorted_by_the_name_they_showed_last():
    assert kind_of("ray::RayTrainWorker") == "Ray Train's processes"
    assert kind_of("ray::TrainController.run") == "Ray Train's processes"
    assert kind_of("ray::IDLE") == "stage tasks (Ray workers)"  # a stage's worker, between tasks
    assert kind_of("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/s") == "Ray's daemons"
    assert kind_of("/x/python -m evaluators.vllm_worker request.json result.json") == "vLLM"
    assert kind_of("/x/python -m builder.cli spec.yaml --workdir runs") == "builds in their own process (CLI)"
    assert kind_of("bash") == "other"


def test_a_process_is_sorted_by_its_busiest_name_or_else_by_its_parent():
    # a stage's worker ran a task, then waited as ray::IDLE: the task decides
    assert kind_of_process(["python default_worker.py", "ray::IDLE", "ray::distill-x-1f2e3d4c5b6a", "ray::IDLE"]) \
        == "stage tasks (Ray workers)"
    assert kind_of_process(["ray::IDLE", "ray::RayTrainWorker"]) == "Ray Train's processes"
    # a Ray worker starts as default_worker.py, whose arguments name the raylet: its task decides
    assert kind_of_process(["/v/python /v/ray/_private/workers/default_worker.py --raylet-name=/tmp/r/raylet",
                            "ray::RayTrainWorker"]) == "Ray Train's processes"
    # vLLM's engine starts as a bare multiprocessing child, then renames itself; one that never
    # did is still the engine's, by its parent
    spawned = "python -B -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5)"
    assert kind_of_process([spawned, "VLLM::EngineCore"]) == "vLLM"
    assert kind_of_process([spawned], ["python -m evaluators.vllm_worker r.json o.json"]) == "vLLM"
    assert kind_of_process([spawned]) == "other"


def test_processes_are_counted_by_what_they_were():
    assert process_name(["ray::IDLE", "ray::distill-qwen3-4b-search.l2-h224-8bdb7d6f96b1aeb8", "ray::IDLE"]) == \
        "ray::distill (a stage)"
    assert process_name(["ray::acquire-data-f900473e52e0a7f7"]) == "ray::acquire-data (a stage)"
    assert process_name(["ray::IDLE", "ray::TrainController.run"]) == "ray::TrainController"
    assert process_name(["ray::IDLE"]) == "ray::IDLE"
    assert process_name(["/v/bin/python -m evaluators.vllm_worker a b"]) == "python -m evaluators.vllm_worker"
    assert process_name(["/v/bin/python -u /v/ray/_private/log_monitor.py --session-dir=/tmp/x"]) == \
        "python log_monitor.py"
    assert process_name(["/v/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/x"]) == "gcs_server"


def test_a_scope_is_the_module_or_its_class():
    assert scope_of("tests/test_e2e.py::test_build_succeeds") == "tests/test_e2e.py"
    assert scope_of("tests/test_rehearse.py::TestQwen3Rehearsal::test_rehearses") == \
        "tests/test_rehearse.py::TestQwen3Rehearsal"
    assert scope_of("tests/test_search.py::test_grid[Llama-3.1-8B.json-4.5e9]") == "tests/test_search.py"


def test_durations_add_up_per_scope_setup_and_calls_together():
    output = ("600.50s call     tests/test_rehearse.py::TestQwen3Rehearsal::test_rehearses\n"
              "8.25s setup    tests/test_rehearse.py::TestQwen3Rehearsal::test_rehearses\n"
              "300.00s setup    tests/test_e2e.py::test_build_succeeds\n"
              "1.00s call     tests/test_e2e.py::test_second_run\n")
    assert seconds_per_scope(output) == {"tests/test_rehearse.py::TestQwen3Rehearsal": 608.75,
                                         "tests/test_e2e.py": 301.0}


def test_the_sampler_counts_a_childs_cpu_time():
    with CpuSampler() as sampler:  # a child that spins 1.5 CPU-s, then sleeps past a sample
        child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 1.5\n"
                                  "while time.process_time() < end: pass\ntime.sleep(1.2)"])
        assert child.wait() == 0
    # It slept 1.2 s after spinning, so a sample (one a second) saw all of its CPU time: 1.5 s
    # of spinning plus the interpreter's start (a fraction of a second, more on a loaded machine).
    assert 1.5 <= sampler.cpu_of(child.pid) <= 4.0
    (seen,) = [seen for (pid, _), seen in sampler.seen.items() if pid == child.pid]
    assert seen.names[0].startswith(sys.executable)
    assert seen.parent == (os.getpid(), psutil.Process().create_time())  # this process started it
    assert sampler.parent_names(seen)  # and was sampled too (at the latest once the block ended)
    assert sampler.by_process()[process_name(seen.names)]["count"] >= 1
