"""Child processes die with the build, even when it is SIGKILLed, and take their shared
memory with them; a pid file lets the next run clean what survived.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from evaluators.process_tree import SHM_DIR, PidFile, group_members, mapped_shm, unlink_shm
from tiny_models import VLLM_TINY, save_tiny_checkpoint, skip_without_vllm

ROOT = Path(__file__).resolve().parents[1]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def python(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, **kwargs)


# A parent that starts a child asking for a death signal, prints the child's pid, then waits.
PARENT = """
    import os, subprocess, sys, time
    from evaluators.process_tree import PARENT_PID_ENV
    child = subprocess.Popen([sys.executable, "-c",
        "from evaluators.process_tree import die_with_parent_from_env; import time; "
        "die_with_parent_from_env(); print('armed', flush=True); time.sleep(600)"],
        env={**os.environ, PARENT_PID_ENV: str(os.getpid())}, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "armed\\n"
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_a_child_dies_when_its_parent_is_sigkilled():
    parent = python(PARENT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    wait_until(lambda: not alive(child), 10, f"the child {child} died with its parent")


def test_a_child_whose_parent_is_already_gone_dies_at_once():
    """The race the expected parent closes: the parent died before the child armed the signal."""
    code = "from evaluators.process_tree import die_with_parent; import time; die_with_parent(9, 1); time.sleep(60)"
    child = python(code)
    assert child.wait(timeout=30) == -signal.SIGKILL


def fake_segment() -> str:
    name = f"minizoo-test-{uuid.uuid4().hex[:8]}"
    (SHM_DIR / name).write_bytes(b"\0" * 4096)
    return name


def test_the_next_run_kills_a_surviving_group_and_unlinks_its_shared_memory(tmp_path):
    survivor = subprocess.Popen(["sleep", "600"], start_new_session=True)
    segment = fake_segment()
    pid_file = PidFile(tmp_path / "worker.pid")
    pid_file.write(survivor.pid, {segment})
    assert pid_file.clean()
    assert survivor.wait(timeout=10) == -signal.SIGKILL
    assert not (SHM_DIR / segment).exists() and not pid_file.path.exists()
    assert not pid_file.clean()  # nothing recorded any more


def test_a_reused_pid_is_never_killed(tmp_path):
    """A record whose leader's start time differs names another process now: leave it be."""
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        pid_file = PidFile(tmp_path / "worker.pid")
        pid_file.write(other.pid)
        record = pid_file.read() | {"start_time": "1"}
        pid_file.path.write_text(json.dumps(record))
        assert pid_file.clean()
        time.sleep(0.2)
        assert alive(other.pid)
    finally:
        other.kill()
        other.wait()


def test_mapped_shared_memory_and_named_semaphores_are_found():
    """A mapped segment, and a named semaphore as loky (in vLLM's engine) makes them: its
    maps show a deleted temporary name, so it is found by inode."""
    pytest.importorskip("joblib")
    name = fake_segment()
    holder = python(f"""
        import mmap, os, time
        from joblib.externals.loky.backend.synchronize import Lock
        lock = Lock()
        with open("/dev/shm/{name}", "r+b") as f:
            m = mmap.mmap(f.fileno(), 4096)
            print(*[n for n in os.listdir("/dev/shm") if n.startswith(f"sem.loky-{{os.getpid()}}-")], flush=True)
            time.sleep(600)
    """, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        semaphore = holder.stdout.readline().strip()
        assert semaphore.startswith("sem.loky-")
        assert holder.pid in group_members(holder.pid)  # with loky's resource tracker
        assert mapped_shm([holder.pid]) == {name, semaphore}
    finally:
        holder.kill()
        holder.wait()
        unlink_shm([name, semaphore])


# The throughput stage's part, run as a process of its own that the test kills.
MEASURE = """
    import sys
    from pathlib import Path
    from evaluators.throughput import ThroughputSettings, measure_model
    settings = ThroughputSettings(input_len=16, output_len=4096, num_prompts=4, kv_cache_gib=0.25,
                                  engine_args={"enforce_eager": True, "max_model_len": 4200}, timeout_s=900)
    measure_model("teacher", Path(sys.argv[1]), settings, Path(sys.argv[2]))
"""


@pytest.mark.slow
def test_killing_the_measuring_process_leaves_no_vllm_process_or_shared_memory(tmp_path):
    skip_without_vllm()
    model = save_tiny_checkpoint(tmp_path / "teacher", max_position_embeddings=4200, **VLLM_TINY)
    out = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(MEASURE), str(model), str(out)], env=env)
    pid_file = PidFile(out / "worker.pid")
    # The worker records its engine's shared memory once the engine is up: kill then, mid-generation.
    wait_until(lambda: (pid_file.read() or {}).get("shm") or parent.poll() is not None, 600, "the engine started")
    assert parent.poll() is None, (out / "worker.log").read_text()[-3000:]
    pgid = pid_file.read()["pgid"]
    members = group_members(pgid)
    segments = mapped_shm(members)
    assert len(members) >= 2 and any(name.startswith("psm_") for name in segments), (members, segments)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_until(lambda: not group_members(pgid), 30, f"every process of the worker's group {members} died")
    assert not [name for name in segments if (SHM_DIR / name).exists()]
    # Named after their creator (loky's sem.loky-PID-*): none of the group's may be left.
    assert not [name for name in os.listdir(SHM_DIR) if any(f"-{pid}-" in name for pid in members)]
