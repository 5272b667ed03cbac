"""An orderly stop on SIGTERM, what schedulers (Slurm, Kubernetes, systemd) send first.

The CLI installs the handler (`sigterm_noted`), which only notes the request: raising from it would unwind
whatever runs at that moment (a Ray call turns a foreign exception into a SystemError; a
file being written would be left half-done). The runner polls `raise_if_stopped()` while it
waits on Ray, cancels the stages in flight and shuts Ray down; the CLI then exits with
STOPPED_EXIT_CODE. A request that comes while the report and cards are written is honoured
once they are. A finished stage's manifest is written atomically by the stage itself, so it
is whole or absent, and a rerun resumes from whatever finished.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process that SIGTERM ended


class BuildStopped(BaseException):
    """SIGTERM asked the build to stop (a BaseException, like KeyboardInterrupt: no
    `except Exception` in the code it unwinds may swallow it)."""


_requested: list[int] = []  # the signals received


@contextmanager
def sigterm_noted() -> Iterator[None]:
    """Within: SIGTERM is noted instead of ending the process (main thread only). The
    previous handler comes back after, so a caller that runs the CLI in-process (the tests)
    keeps its own; and the notes are dropped, so a request noted in one window never stops
    a later command that runs without one (`build-family verify` once exited 143 in-process
    after a test had sent itself a SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()


def _on_sigterm(signum: int, _frame: object) -> None:
    _requested.append(signum)


def stop_requested() -> bool:
    return bool(_requested)


def raise_if_stopped() -> None:
    if _requested:
        raise BuildStopped(f"stopped by signal {signal.Signals(_requested[0]).name}")
