"""Clusters that cannot be reached or refuse the driver, and SIGTERM while Ray starts or
connects (issue 22, item 3). Each ends within the connect timeout with one message naming the
address as given and the cause, exit code 1: not a spec problem, the same command works once
the cluster does. SIGTERM exits 143 at every moment; a rehearsal pointed at a cluster exits 2.
Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from builder.cli import main
from builder.running import interrupt
from builder.running.cluster_address import (ClusterAddress, ClusterUnreachable, auth_refused, check_reachable,
                                             given_address, probe)
from builder.running.ray_session import CONNECT_LOG
from test_paths import make_sources
from test_stop import SPEC
from two_nodes import TwoNodeCluster, free_port

ROOT = Path(__file__).resolve().parents[1]


# --- the address and the messages ------------------------------------------------------


def test_the_address_is_kept_as_given_with_where_it_came_from(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert given_address("ray://other:10001") == ClusterAddress("ray://other:10001", "--address")
    assert given_address(None) == ClusterAddress("head:6379", "RAY_ADDRESS")
    monkeypatch.delenv("RAY_ADDRESS")
    assert given_address(None) is None
    assert ClusterAddress("ray://other:10001", "--address").host_port() == ("other", 10001)
    assert ClusterAddress("[::1]:6379", "--address").host_port() == ("::1", 6379)
    assert ClusterAddress("auto", "--address").host_port() is None  # only Ray can resolve it


def test_a_refused_token_names_the_settings_to_share(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    address = ClusterAddress("127.0.0.1:6379", "--address")
    token = tmp_path / "token"
    token.write_text("not the cluster's")
    missing = str(auth_refused(address, {}))
    wrong = str(auth_refused(address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}))
    absent = str(auth_refused(address, {"RAY_AUTH_MODE": "token"}))
    assert "sent no token (RAY_AUTH_MODE is 'disabled' here" in missing
    assert f"refused the token this driver sent (from RAY_AUTH_TOKEN_PATH={token})" in wrong
    assert "this driver has no token" in absent
    for message in (missing, wrong, absent):
        assert message.startswith("cannot use the Ray cluster at 127.0.0.1:6379 (from --address)")
        assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH" in message


def test_nothing_listening_is_told_at_once(tmp_path):
    address = ClusterAddress(f"127.0.0.1:{free_port()}", "RAY_ADDRESS")
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=rf"at {address.text} \(from RAY_ADDRESS\): nothing listens"):
        check_reachable(address, 30.0, tmp_path / CONNECT_LOG)
    assert time.monotonic() - started < 5.0  # refused at once, not at the 30 s bound
    assert not (tmp_path / CONNECT_LOG).exists()  # Ray was never asked


def test_an_address_nobody_answers_fails_at_the_connect_timeout():
    # A listening socket whose accept queue is full drops further connection requests
    # unanswered, as a firewall or a host that is off does.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with contextlib.ExitStack() as held:
            for _ in range(4):
                client = held.enter_context(socket.socket())
                client.setblocking(False)
                assert client.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
            time.sleep(0.5)
            address = ClusterAddress(f"127.0.0.1:{port}", "--address")
            started = time.monotonic()
            with pytest.raises(ClusterUnreachable, match=r"did not answer within 2 s .*raise --connect-timeout"):
                probe(address, time.monotonic() + 2.0, 2.0)
            assert 2.0 <= time.monotonic() - started < 4.0


def test_a_rehearsal_pointed_at_a_cluster_is_refused(tmp_path, monkeypatch, capsys):
    spec = str(ROOT / "families" / "smollm2-135m.yaml")
    assert main([spec, "--rehearse", "--address", "127.0.0.1:6379", "--workdir", str(tmp_path)]) == 2
    assert "--address: '127.0.0.1:6379': a rehearsal runs on a local Ray instance" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert main([spec, "--rehearse", "--workdir", str(tmp_path)]) == 2
    assert "RAY_ADDRESS: '127.0.0.1:6379'" in capsys.readouterr().err
    assert not (tmp_path / "rehearsal").exists()  # nothing was run


# --- builds through the CLI ------------------------------------------------------------


@pytest.fixture
def family(tmp_path) -> Path:
    make_sources(tmp_path)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    return spec


@contextlib.contextmanager
def silent_server():
    """Accepts connections on 127.0.0.1 and never says a word: no Ray head answers there."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        for connection in held:
            connection.close()


def start_build(spec: Path, *flags: str, env: dict | None = None) -> subprocess.Popen:
    environment = {**(env or os.environ), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "builder.cli", str(spec), "--workdir", str(spec.parent / "runs"),
                             *flags], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, build: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert build.poll() is None, f"the build ended ({build.returncode}):\n{build.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the build"
        time.sleep(0.1)


def connecting(spec: Path):
    """True once the build has begun its trial connection (it writes the connect log then)."""
    return lambda: (spec.parent / "runs" / CONNECT_LOG).exists()


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_silent_address_fails_within_the_connect_timeout(family):
    with silent_server() as address:
        build = start_build(family, "--address", address, "--connect-timeout", "5")
        wait_until(connecting(family), build)
        started = time.monotonic()
        code = build.wait(timeout=60)
    output = build.stdout.read()
    assert code == 1, output[-3000:]
    # The bound, plus the exit of a process that has torch loaded, on a busy machine (without
    # the bound, Ray retries for minutes).
    assert time.monotonic() - started < 5.0 + 25.0
    assert f"cannot use the Ray cluster at {address} (from --address): something listens there but no Ray head " \
           "answered within 5 s" in output
    assert "Traceback" not in output and "Failed to connect" not in output  # Ray's own lines are in the log


def test_sigterm_while_connecting_exits_143_at_once(family):
    with silent_server() as address:
        build = start_build(family, "--address", address, "--connect-timeout", "300")
        wait_until(connecting(family), build)
        time.sleep(1.0)  # Ray's client is trying by now
        trial = children_of(build.pid)
        build.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = build.wait(timeout=60)
    output = build.stdout.read()
    assert code == interrupt.STOPPED_EXIT_CODE, output[-3000:]
    assert time.monotonic() - started < 25.0  # the exit of a process that has torch loaded, on a busy machine
    assert "stopped by signal SIGTERM" in output and "Traceback" not in output
    assert trial and not any(Path(f"/proc/{pid}").exists() for pid in trial)  # the trial connection was killed


def test_sigterm_while_the_local_instance_starts_exits_143(family):
    build = start_build(family, "--verbose", "--cpus-per-stage", "1")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(build.stdout), daemon=True)
    reader.start()
    temp_dir = lambda: next((Path(line.split("Ray temp dir ")[1].split()[0])  # noqa: E731
                             for line in lines if "Ray temp dir " in line), None)
    wait_until(lambda: temp_dir() is not None and any(temp_dir().rglob("session_*")), build, 120)
    build.send_signal(signal.SIGTERM)  # ray.init has begun starting the instance and has not returned
    code = build.wait(timeout=60)
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == interrupt.STOPPED_EXIT_CODE, output[-3000:]  # Ray's own handler exited 15
    assert "stopped by signal SIGTERM" in output and "Traceback" not in output
    assert not temp_dir().exists()


@pytest.mark.slow
def test_a_cluster_refusing_the_driver_says_which_token_to_share(family, tmp_path):
    with TwoNodeCluster(tmp_path / "cluster", cpus=(1,)) as cluster:  # a head alone, with token auth
        without_token = {k: v for k, v in cluster.env().items() if not k.startswith("RAY_AUTH")}
        build = start_build(family, "--address", cluster.address, "--connect-timeout", "50", env=without_token)
        code = build.wait(timeout=60)
        output = build.stdout.read()
        assert code == 1, output[-3000:]
        assert f"cannot use the Ray cluster at {cluster.address} (from --address): the cluster requires Ray's " \
               "token authentication and this driver sent no token" in output
        assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH" in output and "Traceback" not in output
        # Given up at the first refusals, not after Ray's 20 tries, nor at the 50 s bound.
        assert (family.parent / "runs" / CONNECT_LOG).read_text().count("InvalidAuthToken") < 20

        wrong_token = tmp_path / "wrong-token"
        wrong_token.write_text("0" * 64)
        refused = connect_in_child(cluster.address, cluster.env() | {"RAY_AUTH_TOKEN_PATH": str(wrong_token)}, tmp_path)
        assert f"refused the token this driver sent (from RAY_AUTH_TOKEN_PATH={wrong_token})" in refused
        assert connect_in_child(cluster.address, cluster.env(), tmp_path) == "connected to 1 node(s)"


def connect_in_child(address: str, env: dict, workdir: Path) -> str:
    """What a driver with `env` gets from init_ray: connected, or the message it stops with."""
    script = ("import sys, ray\n"
              "from builder.options.run_options import RunOptions\n"
              "from builder.running.cluster_address import ClusterUnreachable\n"
              "from builder.running.ray_session import init_ray\n"
              "try:\n"
              "    init_ray(RunOptions(address=sys.argv[1], workdir=sys.argv[2], connect_timeout_s=50))\n"
              "    print(f'connected to {len(ray.nodes())} node(s)')\n"
              "except ClusterUnreachable as error:\n"
              "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", script, address, str(workdir)], capture_output=True, text=True,
                          timeout=60, env=env | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_work_dir_probe_waits_give_way_to_sigterm(shared_ray):
    import ray

    from builder.running.runner import _get_stoppable

    assert _get_stoppable([ray.put(1), ray.put(2)], 60.0) == [1, 2]
    # A node whose probe task does not come back (a lambda travels by value: workers cannot
    # import this test module).
    stuck = ray.remote(num_cpus=0)(lambda: time.sleep(120)).remote()
    with pytest.raises(ray.exceptions.GetTimeoutError):
        _get_stoppable([stuck], 0.5)
    with interrupt.sigterm_noted():
        os.kill(os.getpid(), signal.SIGTERM)
        started = time.monotonic()
        with pytest.raises(interrupt.BuildStopped):
            _get_stoppable([stuck], 300.0)
        interrupt._requested.clear()  # this test's SIGTERM is spent
    assert time.monotonic() - started < 5.0  # not at the probe's 300 s timeout
    ray.cancel(stuck, force=True)
