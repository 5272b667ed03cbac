"""The Ray session of a build: connect to a cluster (`--address`/RAY_ADDRESS), or start a
local instance bound to loopback, and shut it down again. The runner uses it for a build;
the data runner (builder.data.ray_data) for a preparation outside one; tests for theirs.

A cluster is connected to only once it has answered a trial connection within
`--connect-timeout` (builder.running.cluster_address.check_reachable); otherwise the build
stops with one message naming the address and the cause. A SIGTERM while Ray starts or
connects stops the build like at any other moment (exit code 143).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import ray

from builder.options.cluster import trains_in_its_task
from builder.options.run_options import RunOptions
from builder.running.cluster_address import ClusterAddress, check_reachable, given_address
from builder.running.interrupt import BuildStopped, raise_if_stopped

log = logging.getLogger(__name__)

CONNECT_LOG = "ray-connect.log"  # in the work dir: what Ray printed in the trial connection
_own_temp_dirs: list[str] = []  # Ray temp dirs this process made for its local instances


def init_ray(options: RunOptions) -> bool:
    """Connect to `--address`/RAY_ADDRESS, or start a local instance bound to loopback.
    Returns whether this call connected (and so should disconnect, `shutdown_ray`, when done).

    Without `--verbose` the driver's console stays quiet: every stage captures its own
    output into its stage.log (builder.store.stage_log), so nothing is lost by not streaming
    workers' output to the driver (log_to_driver). Ray's own driver messages are shown from
    ERROR up: its warnings at start-up (token authentication, /dev/shm size) are advice, and
    a real failure reaches the build as a stage's exception."""
    address = given_address(options.address)
    if ray.is_initialized():
        return False
    if address is not None:  # before Ray is asked: Ray alone retries for minutes
        check_reachable(address, options.connect_timeout_s, Path(options.workdir) / CONNECT_LOG, echo=options.verbose)
    with _sigterm_handler_kept():
        try:
            _connect(options, address)
        except BaseException:  # e.g. "node timed out during startup" on a busy machine
            shutdown_ray()  # what did start, and the temp dir, go
            raise
    return True


@contextlib.contextmanager
def _sigterm_handler_kept():
    """ray.init() replaces the driver's SIGTERM handler with sys.exit, and a SIGTERM then
    ended the build with rc 134; the build's own handler (builder.running.interrupt) stops it in
    order, so it is put back."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _connect(options: RunOptions, address: ClusterAddress | None) -> None:
    quiet = {"log_to_driver": options.verbose, "logging_level": logging.INFO if options.verbose else logging.ERROR}
    if address:
        _init_stoppable(address=address.text, **quiet)
    else:
        _keep_on_loopback()
        # address="local" never attaches to a stale cluster left in the temp dir by a killed run.
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls
        # (without it, it logs a warning every second, and asked port 8265, where another
        # instance may answer); on 127.0.0.1 only. A build with one training worker starts no
        # Ray Train group (builder.training.ray_train), so it starts no dashboard: its nine
        # module processes (nodes, state, jobs, metrics, ...) would serve nobody.
        _init_stoppable(address="local", num_cpus=options.local_cpus or os.cpu_count(),
                        include_dashboard=not trains_in_its_task(options.train_workers), dashboard_host="127.0.0.1",
                        _node_ip_address="127.0.0.1", **quiet)


def _init_stoppable(**settings) -> None:
    """ray.init, with the caller's SIGTERM handler in place throughout, then the build stops
    if a SIGTERM came meanwhile (exit code 143, as at any other moment).

    ray.init installs SIGTERM handlers of its own: sys.exit(15) for the driver, and, for a
    head it starts in this process, a drain that waits for the node before sys.exit(1). A
    SIGTERM in that window sometimes vanished (the build ran on and exited 0) or waited out
    the drain (tests/test_cluster_faults.py saw both), so they are not installed while it runs:
    the build's handler (builder.running.interrupt) notes the SIGTERM, and it is acted on once
    ray.init returns, in seconds. Where no handler notes it (a caller without one), the
    default ends the process as before."""
    with _ray_sigterm_handlers_not_installed():
        try:
            ray.init(**settings)
        except SystemExit as exit:  # a handler Ray installs some other way
            if exit.code == signal.SIGTERM:
                raise BuildStopped("stopped by signal SIGTERM") from None
            raise
    raise_if_stopped()


@contextlib.contextmanager
def _ray_sigterm_handlers_not_installed():
    """Ray installs its SIGTERM handlers through ray._private.utils.set_sigterm_handler
    (ray.init's driver handler and the in-process head node's), looked up at each call."""
    utils = ray._private.utils
    original = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


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
    _own_temp_dirs.append(os.environ["RAY_TMPDIR"])
    log.info("Ray temp dir %s (removed at shutdown)", os.environ["RAY_TMPDIR"])


def shutdown_ray() -> None:
    """Disconnect; a local instance's processes are stopped by ray.shutdown(), after which
    its temp dir (sockets, logs, session files: tens of MB a build) is removed."""
    ray.shutdown()
    while _own_temp_dirs:
        shutil.rmtree(_own_temp_dirs.pop(), ignore_errors=True)
