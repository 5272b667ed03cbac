"""A real two-node Ray cluster on this machine, for tests: a head and a worker node, each a
separate `ray start --block` process on 127.0.0.1 with its own resources and temp dir
(`cpus` has one entry per node: `cpus=(1,)` starts the head alone).

    with TwoNodeCluster(tmp_path, cpus=(1, 1)) as cluster:
        subprocess.run([..., "--address", cluster.address], env=cluster.env())

Ray 2.60 turns token authentication on by default, so every node and every driver reads
the same token file (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`). Only the processes this
helper started are stopped (by their process groups); never `ray stop`, which stops every
Ray on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# Variables of a local instance (builder.running.ray_session._keep_on_loopback) that would put a node in
# Ray's single-machine mode, which cannot take a second node.
SINGLE_MACHINE_VARS = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR", "RAY_ADDRESS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TwoNodeCluster:
    def __init__(self, root: Path, cpus: tuple[int, ...] = (1, 1), resources: tuple[dict, ...] | None = None):
        self.root = Path(root)
        self.cpus, self.resources = cpus, resources or tuple({} for _ in cpus)
        self.port = free_port()
        self.token = self.root / "ray-token"
        self.processes: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of a node or a driver of this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in SINGLE_MACHINE_VARS}
        return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token),
                      "RAY_USAGE_STATS_ENABLED": "0"}

    def __enter__(self) -> "TwoNodeCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self.token.write_text(secrets.token_hex(32))
        try:
            # A dashboard, as a user's cluster has: Ray Train's placement-group cleaner asks
            # the State API it serves whether the controller lives. Without one, the address
            # the cluster registers is the default port 8265, where another cluster on this
            # machine may answer "no such actor" and the cleaner ends a live training run.
            self._start(0, ["--head", f"--port={self.port}", "--include-dashboard=true",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"])
            for index in range(1, len(self.cpus)):
                self._start(index, [f"--address={self.address}"])
            self.wait_for_nodes(len(self.cpus))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, index: int, role: list[str]) -> None:
        # Short temp dirs: Ray puts Unix sockets in them (a 107-byte path limit).
        temp_dir = tempfile.mkdtemp(prefix=f"mz2n{index}-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        log = open(self.root / f"node-{index}.log", "wb")
        command = [RAY, "start", "--block", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus[index]}",
                   "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                   f"--resources={json.dumps(self.resources[index])}"]
        # A session of its own, so stop() can end exactly this node's process tree.
        self.processes.append(subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def wait_for_nodes(self, count: int, timeout_s: float = 180.0) -> None:
        probe = ("import ray; ray.init(address=%r, log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))") % self.address
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_running()
            done = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(2)
        raise TimeoutError(f"the two-node cluster did not come up in {timeout_s:.0f} s; see {self.root}/node-*.log")

    def _check_running(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is not None:
                log = (self.root / f"node-{index}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray node {index} exited with {process.returncode}:\n{log}")

    def stop(self) -> None:
        """End the worker node, then the head: each `ray start` process with every process it
        started (its session), SIGTERM first, SIGKILL after a grace period."""
        for process in reversed(self.processes):
            _end_session(process)
        self.processes.clear()


def _end_session(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the session, then SIGKILL to whatever of it is left (raylet's workers may
    outlive the `ray start` process that leads it)."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
