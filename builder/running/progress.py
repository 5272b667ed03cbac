"""What a stage is doing, read from the store alone: no Ray, cheap enough to poll.

    done     its manifest exists (written last, so the stage is complete)
    running  a live build holds the stage's lock exclusively (`stages/.locks/<stage>.lock`, see
             StageStore.locked; builds reading a stage as input hold it shared). flock
             locks die with their process, so a killed build never leaves a stale "running".
    partial  its folder exists without a manifest: an interrupted stage, resumed next time
    pending  nothing on disk yet

Progress comes from the files stages write anyway: training stages append one line per
step to `metrics.jsonl` with the tokens seen so far, and their spec section holds the
token budget. The driver polls these files (a stat and a read of the file's tail) instead
of asking Ray actors, so the same code serves the live view of a build, `build-family
status` from another shell, and a build on a cluster whose work dir is shared.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from builder.stages.base import Stage
from builder.stages.registry import stage_kind
from builder.store.stage_log import stage_log_path
from builder.store.stage_store import MANIFEST, StageStore, lock_path



@dataclass(frozen=True)
class Progress:
    done: int  # tokens trained so far
    total: int  # the stage's token budget

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def is_running(lock_file: Path) -> bool:
    """True when a process holds the lock exclusively, as a build running the stage does.
    Probes with a non-blocking shared lock, released at once: readers' shared locks do not
    conflict with it, and a build that wants the lock in that instant waits for it (it
    never gives up), so the probe cannot disturb a build."""
    try:
        handle = open(lock_file, "rb")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def stage_state(store: StageStore, stage: Stage) -> str:
    folder = store.path(stage.key)
    if (folder / MANIFEST).exists():
        return "done"
    if is_running(lock_path(folder)):
        return "running"
    return "partial" if folder.exists() else "pending"


def started_since(store: StageStore, stage: Stage, since: float) -> bool:
    """Whether the stage began running after `since` (a time.time()): its process writes
    a header to stage.log when it starts."""
    try:
        return os.stat(stage_log_path(store.path(stage.key))).st_mtime >= since
    except FileNotFoundError:
        return False


def training_progress(store: StageStore, stage: Stage) -> Progress | None:
    """Tokens trained so far against the budget, for distill/correct stages."""
    total = stage.key.config.get("tokens") if stage_kind(stage.name).resumable else None
    if not total:
        return None
    last = _last_json_line(store.path(stage.key) / "metrics.jsonl")
    return Progress(int(last.get("tokens", 0)) if last else 0, int(total))


def _last_json_line(path: Path, tail_bytes: int = 4096) -> dict | None:
    """The last complete JSON line of a file that is being appended to."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - tail_bytes))
            lines = handle.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written, or the tail's cut first line
    return None
