"""Disk space: a stage checks that the disk holds what its outputs need before it writes,
and a disk that fills anyway becomes one message (path, space needed and free, what to
do), never a traceback; partial files are removed either way.

    with space_checked(out_dir, needed, "stage distill-x-1a2b"):   # DiskFull before or during
        run the stage
    with removed_on_failure(tmp):                                   # no partial file is left
        write tmp

`needed` is the estimate's figure (builder.planning.cost_model.Disk: a checkpoint's size is
its parameter count times CHECKPOINT_BYTES_PER_PARAM), less what the stage's folder holds
already (a resumed stage's last checkpoint). A full disk shows itself in several shapes: an
OSError with ENOSPC or EDQUOT (Python's own writes, numpy, DCP's writer threads), a
RuntimeError from a native writer quoting the OS's words (safetensors), torch's C++ stream
writer's "unexpected pos" RuntimeError, which carries no errno, and any of these wrapped by
DCP (CheckpointException) or Ray Train (WorkerGroupError); `as_disk_full` looks through them.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from builder.units import format_bytes

log = logging.getLogger(__name__)

# Room for what every stage writes besides its outputs: its log, metrics, manifest and
# result files (kilobytes to a few MB), so no stage starts on a disk one log line would fill.
LOG_ROOM_BYTES = 32 * 10**6

OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
OUT_OF_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")
# torch.save's C++ writer reports a short write without its errno ("[enforce fail at
# inline_container.cc:672] . unexpected pos 704 vs 598"): out of space only if the disk is
# in fact short of what the stage needs (any other write error is left as it is).
SHORT_WRITE_WORDS = ("unexpected pos", "PytorchStreamWriter failed writing")


class DiskFull(OSError):
    """Not enough disk space for what `what` writes at `path`: found before it wrote, or when
    the disk filled while it wrote. An OSError with ENOSPC, so callers that catch a full disk
    catch this one too."""

    def __init__(self, path: str | Path, needed: float, free: float, what: str):
        self.path, self.needed, self.free, self.what = str(path), needed, free, what
        super().__init__(errno.ENOSPC, _message(self.path, needed, free, what), self.path)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # a stage's error crosses to the driver pickled by Ray
        return type(self), (self.path, self.needed, self.free, self.what)


def _message(path: str, needed: float, free: float, what: str) -> str:
    if needed > free:
        space = f"{what} needs {format_bytes(needed)}, {format_bytes(free)} is free; free at least " \
                f"{format_bytes(needed - free)} there"
    elif needed <= 0:  # a write whose size nobody planned (the driver's small files)
        space = f"{what} needs more than the {format_bytes(free)} that is free; free space there"
    else:  # enough now: the space went to other writers (stages side by side, other programs) meanwhile
        space = (f"{what} needs {format_bytes(needed)}, {format_bytes(free)} is free now but the disk filled while "
                 "it wrote (other stages or programs write there too); free space there")
    return (f"disk full at {path}: {space} or use a --workdir on a larger disk, then run the same command again "
            "(finished stages are reused)")


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds `path` (its nearest existing folder if it is not there yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(path: str | Path, needed: float, what: str) -> None:
    """Raise DiskFull unless the disk at `path` has `needed` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFull(path, needed, free, what)


@contextmanager
def space_checked(folder: Path, needed: float, what: str) -> Iterator[None]:
    """Run a stage writing into `folder`, which at its peak holds `needed` bytes of outputs.

    Before: partial files a killed run left are removed, and the disk must have what the
    folder still lacks of `needed` (a resumed stage holds part of it), plus LOG_ROOM_BYTES.
    During: a full disk anywhere under the block (in this process, in DCP's writer threads,
    in a Ray Train worker) removes the partial files and raises DiskFull instead."""
    remove_partial_files(folder)
    require_free_space(folder, _still_needed(folder, needed), what)
    try:
        yield
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        remove_partial_files(folder)  # before measuring: what is free after is what the user has
        full = as_disk_full(error, folder, _still_needed(folder, needed), what)
        if full is None:
            raise
        raise full from error


def _still_needed(folder: Path, needed: float) -> float:
    return max(needed - bytes_under(folder), 0.0) + LOG_ROOM_BYTES


def as_disk_full(error: BaseException, path: str | Path, needed: float, what: str) -> DiskFull | None:
    """`error` as a DiskFull when a full disk caused it (see the module's docstring), else None.
    The path named is the file the OS named, if it did, else `path`."""
    causes = list(_causes(error))
    found = next((cause for cause in causes if isinstance(cause, DiskFull)), None)
    if found is not None:
        return found
    certain = [cause for cause in causes if _says_out_of_space(cause)]
    free = free_bytes(path)
    short_write = any(word in str(cause) for cause in causes for word in SHORT_WRITE_WORDS)
    if not certain and not (short_write and free < needed):
        return None
    named = next((cause.filename for cause in certain if getattr(cause, "filename", None)), None)
    return DiskFull(named or path, needed, free, what)


def _says_out_of_space(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in OUT_OF_SPACE_ERRNOS:
        return True
    return any(word in str(error) for word in OUT_OF_SPACE_WORDS)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it wraps, once each: Python's chain, a Ray task's `cause`,
    Ray Train's per-worker failures, DCP's per-rank failures ((exception, traceback) pairs)."""
    seen: set[int] = set()
    waiting = [error]
    while waiting:
        current = waiting.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        waiting += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        waiting += list((getattr(current, "worker_failures", None) or {}).values())
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            waiting += [failure[0] if isinstance(failure, tuple) else failure for failure in failures.values()]


# --- partial files ---------------------------------------------------------------------------


def is_partial(name: str) -> bool:
    """The project's temporaries: `.tmp-*` (atomic writes, `.tmp-step-*` checkpoints, `.tmp-model`)
    and `*.tmp` (token and signal shards, evaluators' results), renamed once complete."""
    return name.startswith(".tmp-") or name.endswith(".tmp")


def remove_partial_files(folder: Path) -> list[Path]:
    """Remove every temporary under `folder` (call it where nothing else writes there: the
    stage's lock is held and its workers have ended); returns what was removed."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            if is_partial(name):
                removed.append(Path(root) / name)
                _remove(Path(root) / name)
        dirs[:] = [name for name in dirs if not is_partial(name)]
    if removed:
        log.info("removed %d partial file(s) under %s: %s", len(removed), folder, ", ".join(map(str, removed)))
    return removed


@contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """Remove the file or folder `path` if the block fails, so a failed write (a full disk
    above all) leaves no partial temporary that keeps the disk full."""
    try:
        yield
    except BaseException:
        _remove(path)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def bytes_under(folder: Path) -> int:
    """Bytes the files under `folder` take (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed meanwhile
                continue
    return total
