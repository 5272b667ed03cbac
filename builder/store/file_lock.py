"""Taking turns between builds that share a work dir: an flock on a lock file.

    with file_lock(folder / ".view.lock", waiting="another build is writing the view"):
        ...  # one build at a time

Used for each stage (`StageStore.locked`) and for a family's view (builder.report.family_view).

flock is released by the kernel when the holder dies, even by SIGKILL, so a killed build
never leaves a stale lock. On NFS, Linux clients implement flock with the server's
byte-range locks (NLM for v3, built into v4), so builds on several nodes exclude each
other too; a node that dies holding a lock releases it when its lease expires (NFSv4:
about 90 s). Mounts with `local_lock=flock` or `nolock` (and Lustre without `-o flock`)
keep locks per node: there, run one build per work dir.
"""
from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextmanager
def file_lock(path: Path, shared: bool = False, waiting: str = "") -> Iterator[None]:
    """Hold `path`'s lock, exclusive or shared; a holder of a conflicting one makes this wait,
    logging `waiting` first. Lock files are never deleted: a waiter still holding a deleted
    file's inode would "lock" a file that the next build, creating a new one, never sees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting  %s", waiting or path)
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
