"""Child processes that cannot outlive the build, and the shared memory they leave behind.

A stage that starts a process tree (vLLM's engine: our worker, vLLM's engine core, its
helpers) owns it through three means, each covering what the one before cannot:

1. A parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`), set by each child at its
   start: the kernel signals the child when its parent dies, even by SIGKILL, when no code
   of ours can run. The kernel watches the parent *thread* that forked the child, not the
   whole process; see the callers for why their forking thread is the right one.
2. A process group of its own (`start_new_session`), killed whole when the stage is done
   with it, after noting which /dev/shm files the group has mapped and unlinking them.
3. A pid file beside the stage's output naming the group (and the shared memory it had
   mapped): a later run that finds one kills what survived and unlinks the segments.

Shared memory: vLLM's message queues and tensor arenas are Python `SharedMemory` segments
(/dev/shm/psm_*, vllm/distributed/device_communicators/shm_broadcast.py and friends), which
vLLM deliberately unregisters from multiprocessing's resource tracker, so nothing removes
them when the engine is killed. Rather than guess names, the segments are read from the
memory maps of the group's processes: whatever they map under /dev/shm is theirs.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PARENT_PID_ENV = "MINIZOO_PARENT_PID"  # the pid a child expects as its parent (see die_with_parent)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_KILL_WAIT_S = 5.0  # how long a SIGKILLed group may take to vanish from /proc


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> None:
    """Ask the kernel to send `sig` to this process when its parent (thread) dies.

    `expected_parent` closes the race of a parent that died before this call: then the
    signal would never come, so it is sent now. No-op where prctl does not exist (not Linux).
    """
    prctl = libc_prctl()
    if prctl is None:  # not Linux
        return
    if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


@functools.lru_cache(maxsize=1)
def libc_prctl():
    """libc's prctl, or None where there is none. Looked up once: a child forked from a
    threaded process should call it without entering the dynamic loader."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent_from_env(sig: int = signal.SIGKILL) -> None:
    """die_with_parent for a child started with PARENT_PID_ENV set by its parent."""
    expected = os.environ.get(PARENT_PID_ENV)
    die_with_parent(sig, int(expected) if expected else None)


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid` (zombies excluded: they hold no memory)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def mapped_shm(pids: list[int]) -> set[str]:
    """Names of the /dev/shm files the processes have mapped (shared memory, semaphores).

    Matched by inode, not by the path in the maps: glibc's sem_open maps a temporary file
    and then links it under the semaphore's name (loky's `sem.loky-*`), so the maps show
    the temporary name, deleted, while the file that stays behind has another."""
    inodes = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)  # address perms offset dev inode [path]
            if len(parts) == 6 and parts[5].startswith(f"{SHM_DIR}/"):
                inodes.add(int(parts[4]))
    return {entry.name for entry in os.scandir(SHM_DIR) if entry.inode() in inodes}


def unlink_shm(names: set[str] | list[str]) -> None:
    for name in names:
        if "/" in name:  # never leave /dev/shm, whatever a pid file says
            continue
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            pass


def kill_group(pgid: int, known_shm: set[str] = frozenset()) -> None:
    """SIGKILL a process group and unlink every /dev/shm file it has mapped (plus `known_shm`).

    From outside the group, the group is stopped first, so no member maps a new segment
    between the reading of its maps and the kill. Unlinking a mapped segment is safe: its
    memory is freed when the last mapping goes, i.e. when the group dies."""
    outside = pgid != os.getpgrp()
    if outside:
        _signal_group(pgid, signal.SIGSTOP)
    unlink_shm(mapped_shm(group_members(pgid)) | set(known_shm))
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + _KILL_WAIT_S
    while outside and group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class PidFile:
    """A record of a running process group (and the shared memory it maps) beside a stage's
    output, removed when the group is stopped; one found later names survivors to clean."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, pgid: int, shm: set[str] = frozenset()) -> None:
        record = {"pgid": pgid, "start_time": _start_time(pgid), "shm": sorted(shm)}
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(record))
        partial.replace(self.path)

    def add_shm(self, shm: set[str]) -> None:
        record = self.read()
        if record is not None:
            self.write(record["pgid"], set(record["shm"]) | shm)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def clean(self) -> bool:
        """Kill the recorded group if it still runs (the same processes: its leader's start
        time matches, so a reused pid is never killed), unlink its shared memory, remove the
        file. Returns whether there was a record."""
        record = self.read()
        if record is None:
            return False
        pgid = record["pgid"]
        alive = record["start_time"] is not None and _start_time(pgid) == record["start_time"]
        # A group outlives its leader; the kernel reuses no pid still naming a live group.
        orphans = _start_time(pgid) is None and group_members(pgid)
        if alive or orphans:
            log.warning("stopping processes left by an earlier run (process group %d)", pgid)
            kill_group(pgid, set(record["shm"]))
        else:
            unlink_shm(record["shm"])
        self.path.unlink(missing_ok=True)
        return True


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22 of /proc/PID/stat: start time in ticks
