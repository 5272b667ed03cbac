"""A Ray cluster's address (`--address`/RAY_ADDRESS): whether the cluster answers there, and
why not, in one message naming the address as given, the cause and the fix.

No Ray here: the CLI imports `ClusterUnreachable` at start-up. Ray alone, given an address
where nothing answers, retries inside its C++ client for minutes, deaf to SIGTERM (one took
24 s to act on it, and exited 15), printing the address it resolved (127.0.0.1 becomes this
machine's IP) rather than the one given; a cluster that refuses the driver's auth token ends
in a 40-line traceback. So before builder.running.ray_session connects:

1. a TCP connect to the address's port tells a head that is down (nothing listens), a host
   name that does not resolve and an address nobody answers (a firewall, a host that is
   off) apart;
2. a trial connection, Ray's own `ray.init` in a child process that can be killed, shows
   that a Ray head answers there and accepts this driver's token. Its output goes to a log
   file; the wait ends at the connect timeout, at the first sign that the token was refused
   (Ray retries that 20 times, as it cannot tell it from a head still starting), or on SIGTERM.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from builder.running.interrupt import raise_if_stopped

POLL_S = 0.2  # how often a wait looks for a SIGTERM (builder.running.interrupt)
# What Ray 2.60 says, in its exceptions and in its client's log lines, when the cluster
# refuses a driver's token (gRPC status Unauthenticated, Ray's InvalidAuthToken).
AUTH_REFUSED = ("Unauthenticated", "InvalidAuthToken", "AuthenticationError")
TOKEN_FIX = ("share the cluster's token with this driver: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to a "
             "copy of the token file the head was started with (or RAY_AUTH_TOKEN to its content)")
HEAD_PORTS = "HEAD:6379 unless `ray start --head` said otherwise; ray://HEAD:10001 for Ray Client"
TRIAL = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); ray.shutdown()"


class ClusterUnreachable(Exception):
    """The cluster at the given address cannot be used; the message names the address, the
    cause and the fix. No stage was run (the CLI exits with code 1)."""


@dataclass(frozen=True)
class ClusterAddress:
    text: str  # as the user gave it: HOST:PORT, ray://HOST:PORT (Ray Client) or Ray's "auto"
    source: str  # where it came from: "--address" or "RAY_ADDRESS"

    def __str__(self) -> str:
        return f"{self.text} (from {self.source})"

    def host_port(self) -> tuple[str, int] | None:
        """The host and port to probe; None for an address only Ray can resolve ("auto")."""
        host, colon, port = self.text.split("://", 1)[-1].rpartition(":")
        if not colon or not host or not port.isdigit():
            return None
        return host.strip("[]"), int(port)


def given_address(flag: str | None) -> ClusterAddress | None:
    """The cluster a build was pointed at: `--address`, else RAY_ADDRESS; None: a local instance."""
    if flag:
        return ClusterAddress(flag, "--address")
    from_environment = os.environ.get("RAY_ADDRESS")
    return ClusterAddress(from_environment, "RAY_ADDRESS") if from_environment else None


def check_reachable(address: ClusterAddress, timeout_s: float, log: Path, echo: bool = False) -> None:
    """Raise ClusterUnreachable unless a Ray head at `address` accepts this driver within
    `timeout_s`; what Ray prints meanwhile goes to `log` (and to stderr too with `echo`).
    A SIGTERM meanwhile raises BuildStopped."""
    deadline = time.monotonic() + timeout_s
    probe(address, deadline, timeout_s)
    output, finished = trial_connection(address, deadline, log)
    if echo:
        sys.stderr.write(output)
    if finished is not True:
        raise trial_failure(address, timeout_s, output, log, ended=finished is not None)


def unreachable(address: ClusterAddress, cause: str, fix: str) -> ClusterUnreachable:
    return ClusterUnreachable(f"cannot use the Ray cluster at {address}: {cause}; {fix}. No stage was run.")


# --- 1. does anything listen? ----------------------------------------------------------


def probe(address: ClusterAddress, deadline: float, timeout_s: float) -> None:
    """Raise ClusterUnreachable unless something accepts a TCP connection at the address's
    port before `deadline` (`timeout_s` after the start, for the message)."""
    target = address.host_port()
    if target is None:
        return
    host, port = target
    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise unreachable(address, f"the host name {host!r} does not resolve ({error.strerror})",
                          "check the head's host name or give its IP address") from None
    code = errno.ETIMEDOUT
    for family, _, _, _, sockaddr in candidates:
        code = _tcp_connect(family, sockaddr, deadline)
        if code == 0:
            return
    raise _unanswered(address, host, port, code, timeout_s)


def _tcp_connect(family: int, sockaddr: tuple, deadline: float) -> int:
    """0 once connected, else the errno (ETIMEDOUT at `deadline`); polled, so that a SIGTERM
    is acted on while a connect to a silent host waits."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        code = sock.connect_ex(sockaddr)
        while code in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
            raise_if_stopped()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return errno.ETIMEDOUT
            _, writable, _ = select.select([], [sock], [], min(POLL_S, remaining))
            if writable:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return code


def _unanswered(address: ClusterAddress, host: str, port: int, code: int, timeout_s: float) -> ClusterUnreachable:
    if code == errno.ECONNREFUSED:
        return unreachable(address, f"nothing listens at {host}:{port} (connection refused)",
                           f"start the head there (`ray start --head --port {port}`) or give the address "
                           f"of a running head ({HEAD_PORTS})")
    if code == errno.ETIMEDOUT:
        return unreachable(address, f"{host}:{port} did not answer within {timeout_s:g} s (a firewall, a host "
                           "that is off, or a wrong address)",
                           f"check the address, or raise --connect-timeout (now {timeout_s:g} s) on a slow network")
    return unreachable(address, f"{host}:{port} cannot be reached ({os.strerror(code)})",
                       "check the address and this machine's network route to the head")


# --- 2. does a Ray head answer, and accept this driver? --------------------------------


def trial_connection(address: ClusterAddress, deadline: float, log: Path) -> tuple[str, bool | None]:
    """Ray's ray.init to `address` in a child process, its output appended to `log`. Returns
    that output and whether the child connected (None: stopped at `deadline`, or once the
    output shows the token refused). The child is killed whatever ends the wait."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        sink.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} trial connection to {address}\n".encode())
        start = sink.tell()
        child = subprocess.Popen([sys.executable, "-c", TRIAL, address.text], stdin=subprocess.DEVNULL,
                                 stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = _wait_for(child, deadline, lambda: refused_auth(_read_from(log, start)))
    finally:
        _kill_session(child)
    return _read_from(log, start), (None if code is None else code == 0)


def _wait_for(child: subprocess.Popen, deadline: float, refused) -> int | None:
    """The child's exit code, or None at `deadline` or once `refused()`."""
    while time.monotonic() < deadline and not refused():
        try:
            return child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            raise_if_stopped()
    return None


def _kill_session(child: subprocess.Popen) -> None:
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as text:
        text.seek(offset)
        return text.read().decode(errors="replace")


def trial_failure(address: ClusterAddress, timeout_s: float, output: str, log: Path, ended: bool) -> ClusterUnreachable:
    """Why the trial connection failed although something listens: `output` is what Ray
    printed, `ended` whether it gave up by itself (else it was stopped)."""
    if refused_auth(output):
        return auth_refused(address, os.environ)
    if not ended:
        return unreachable(address, f"something listens there but no Ray head answered within {timeout_s:g} s "
                           f"(Ray's messages: {log})", f"check that it is the head's GCS port ({HEAD_PORTS}), or "
                           f"raise --connect-timeout (now {timeout_s:g} s) if the head is still starting")
    last = [line for line in output.splitlines() if line.strip()][-1:] or ["(it printed nothing)"]
    return unreachable(address, f"Ray could not connect: {last[0].strip()} (all of Ray's messages: {log})",
                       "check that the head is up and runs the same Ray version as this driver")


def refused_auth(text: str) -> bool:
    return any(sign in text for sign in AUTH_REFUSED)


def auth_refused(address: ClusterAddress, environ) -> ClusterUnreachable:
    """The cluster refused this driver for want of its token: which token was sent, if any."""
    mode = environ.get("RAY_AUTH_MODE", "disabled")
    if mode != "token":
        cause = (f"the cluster requires Ray's token authentication and this driver sent no token (RAY_AUTH_MODE is "
                 f"{mode!r} here, not 'token')")
    else:
        source = token_source(environ)
        cause = (f"the cluster refused the token this driver sent (from {source}): it is not the cluster's"
                 if source else "RAY_AUTH_MODE=token is set here but this driver has no token (RAY_AUTH_TOKEN and "
                 "RAY_AUTH_TOKEN_PATH are unset, and there is no ~/.ray/auth_token)")
    return unreachable(address, cause, TOKEN_FIX)


def token_source(environ) -> str | None:
    """Where Ray reads this driver's token from, in Ray's order; None when it has none."""
    if environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" + ("" if Path(path).is_file() else ", a file that does not exist")
    default = Path("~/.ray/auth_token").expanduser()
    return str(default) if default.is_file() else None
