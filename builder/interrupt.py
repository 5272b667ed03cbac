"""An orderly stop on SIGTERM, what schedulers (Slurm, Kubernetes, systemd) send first.

The CLI installs the handler. While the runner waits on Ray (inside `interruptible()`), a
SIGTERM raises BuildStopped there: the runner cancels the stages in flight and shuts Ray
down, and the CLI exits with STOPPED_EXIT_CODE. Anywhere else (validation, writing the
report and cards) the request is only noted and honoured when that work is done, so a stop
never leaves a file half-written. A finished stage's manifest is written atomically by the
stage itself, so it is whole or absent; a rerun resumes from whatever finished.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process that SIGTERM ended


class BuildStopped(BaseException):
    """SIGTERM asked the build to stop (a BaseException, like KeyboardInterrupt: no
    `except Exception` in a stage or library may swallow it)."""


_requested: list[int] = []  # the signal received, if any
_interruptible_depth = 0


def install() -> None:
    """Turn SIGTERM into an orderly stop (call from the main thread)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, _frame: object) -> None:
    _requested.append(signum)
    if _interruptible_depth:
        raise BuildStopped(f"stopped by signal {signal.Signals(signum).name}")


def stop_requested() -> bool:
    return bool(_requested)


@contextmanager
def interruptible() -> Iterator[None]:
    """A section a SIGTERM may interrupt at once (waiting on Ray); one received before it
    stops the build on entry."""
    global _interruptible_depth
    if _requested:
        raise BuildStopped("stopped by a signal received earlier")
    _interruptible_depth += 1
    try:
        yield
    finally:
        _interruptible_depth -= 1
