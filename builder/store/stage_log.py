"""Each stage's full output in `<stage dir>/stage.log`, captured where it is produced.

    with captured_output(stage_log_path(out_dir), tee=False):
        run the stage   # Python prints, logging, tqdm, C extensions and child processes

Capturing works on file descriptors 1 and 2, not on `sys.stdout`: transformers, lm-eval,
vLLM's engine processes and torch's C++ warnings all write there, and child processes
inherit them. The runner's Ray task and every Ray Train worker capture into the same file
(opened for appending, so their lines interleave instead of overwriting each other), and a
resumed stage appends to the log of its earlier attempt. With `tee` (`--verbose`), the
output also still goes where it went before: Ray streams it to the driver's terminal.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

STAGE_LOG = "stage.log"


def stage_log_path(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / STAGE_LOG


@contextlib.contextmanager
def captured_output(path: Path, tee: bool = False) -> Iterator[None]:
    """Route this process's stdout and stderr into `path` (appending) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _flush_python_streams()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} ====\n".encode())
        target, copier = _tee(log, saved[0]) if tee else (log.fileno(), None)
        os.dup2(target, 1)
        os.dup2(target, 2)
        # Whoever replaced sys.stdout/sys.stderr (Ray, pytest) bypasses descriptors 1 and 2.
        streams = sys.stdout, sys.stderr
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")
        try:
            yield
        finally:
            _flush_python_streams()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            if copier is not None:
                os.close(target)
                copier.join(timeout=2.0)  # a child still holding the pipe must not hang the stage
            for fd in saved:
                os.close(fd)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _tee(log, terminal_fd: int) -> tuple[int, threading.Thread]:
    """A pipe whose every byte a thread copies to the log and to the original stdout."""
    read_end, write_end = os.pipe()

    def copy() -> None:
        # OSError/ValueError: a straggling child outlived the stage and the files are closed.
        with os.fdopen(read_end, "rb", buffering=0) as pipe, contextlib.suppress(OSError, ValueError):
            while chunk := pipe.read(65536):
                log.write(chunk)
                os.write(terminal_fd, chunk)

    thread = threading.Thread(target=copy, name="stage-log-tee", daemon=True)
    thread.start()
    return write_end, thread
