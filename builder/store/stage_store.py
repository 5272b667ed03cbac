"""Content-addressed stage outputs.

Every stage writes into `<workdir>/stages/<stage>-<hash>/`, where the hash covers what
the stage's result depends on: the settings it reads (its spec section, less the fields
marked execution-only), the run options that change its numerics (the resolved training
precision), its upstream hashes and its own code version (its kind's `version`, builder.stages). The stage's
`manifest.json` is written last, atomically: its existence means the stage finished, so a
finished stage is never recomputed, and a directory without one is a stage that was
interrupted (long stages keep resumable checkpoints inside it).

The manifest also records the stage's output files (builder.store.integrity): their
fingerprints, checked before the stage is reused, and their content digests, checked by every
stage that reads them (builder.store.content). A reader that finds a file's bytes changed
leaves a DAMAGED mark in the stage's folder, so the next build redoes the stage. It also
records what made it (builder.store.provenance: versions and commit, reported but
not deciding reuse); one build at a time runs a stage: see `StageStore.locked`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from builder.store.file_lock import file_lock
from builder.store.disk_space import removed_on_failure
from builder.store.integrity import find_damage, record_outputs
from builder.store.provenance import Provenance, running_provenance
from builder.store.stage_log import STAGE_LOG

log = logging.getLogger(__name__)

STAGES = "stages"  # the store's folder in a work dir: <workdir>/stages/<stage id>/
MANIFEST = "manifest.json"
DAMAGED = "damaged.json"  # left in a finished stage's folder by a reader that found a file changed
# Not outputs: resumable training state (large, read by no other stage), the manifest itself,
# the stage's log (its writers may still flush a line after the manifest is written) and a mark.
NOT_OUTPUTS = (MANIFEST, "checkpoints", STAGE_LOG, DAMAGED)
LOCKS = ".locks"  # per-stage lock files, beside the stage folders (never deleted: see file_lock)
TRASH = ".trash"  # replaced stage folders are moved here, then deleted


@dataclass(frozen=True)
class StageKey:
    """A stage's identity: equal digests promise equal results (up to float summation order)."""

    stage: str  # e.g. "distill"
    label: str  # human part of the directory name, e.g. the student's name
    config: dict[str, Any]  # the settings its result depends on (spec section less execution-only fields)
    upstream: tuple[str, ...] = ()  # hashes of the stages it reads
    version: str = ""  # its code's version, builder.stages: its kind's `version`
    options: dict[str, Any] = field(default_factory=dict)  # resolved run options that change its numerics
    # How it runs, not what it computes (batch sizes, checkpoint interval): NOT hashed.
    execution: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        payload = {"stage": self.stage, "version": self.version, "config": self.config,
                   "options": self.options, "upstream": list(self.upstream)}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.stage}-{self.label}-{self.digest}" if self.label else f"{self.stage}-{self.digest}"


@dataclass
class Manifest:
    """What a finished stage records; `summary` holds its stage-specific results."""

    stage: str
    digest: str
    path: str
    wall_s: float
    tokens: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    # relative file name -> its fingerprint and content digest (builder.store.integrity.file_record);
    # None in manifests written before outputs were recorded (nothing to check)
    outputs: dict[str, dict] | None = None
    finished_at: float = 0.0  # time.time() when written: tells one finish of a stage from another
    provenance: Provenance | None = None  # what made it; None in manifests written before it was recorded
    # stage id -> finished_at of each stage it read: the finishes its results are of (a later
    # finish of an input makes them stale: builder.planning.reuse); None before it was recorded
    inputs: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        provenance = self.provenance.model_dump() if self.provenance is not None else None
        return {**self.__dict__, "provenance": provenance}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A manifest.json as read; raises TypeError or ValueError when it is not one."""
        fields = dict(data)
        if fields.get("provenance") is not None:
            fields["provenance"] = Provenance.model_validate(fields["provenance"])
        return cls(**fields)

    @property
    def stage_id(self) -> str:
        return Path(self.path).name

    def damage(self, full: bool = False) -> tuple[str, str] | None:
        """The first recorded output that is missing or changed, as (path, fault), a reader's
        DAMAGED mark first; None if intact. `full` reads every file to check its content digest."""
        found = damage_mark(Path(self.path)) or find_damage(Path(self.path), self.outputs or {}, full)
        return (str(Path(self.path) / found[0]), found[1]) if found else None


class StageStore:
    def __init__(self, workdir: Path):
        self.root = Path(workdir).resolve() / STAGES

    def path(self, key: StageKey) -> Path:
        return self.root / key.dirname

    def manifest(self, key: StageKey) -> Manifest | None:
        return read_manifest(self.path(key))

    def prepare(self, key: StageKey) -> Path:
        out = self.path(key)
        out.mkdir(parents=True, exist_ok=True)
        return out

    def finish(self, key: StageKey, wall_s: float, tokens: int, summary: dict[str, Any],
               inputs: list[Manifest] | None = None) -> Manifest:
        """Record the stage as finished; `inputs`: the finished stages it read (None: not recorded)."""
        outputs = record_outputs(self.path(key), skip=NOT_OUTPUTS)
        read = None if inputs is None else {found.stage_id: found.finished_at for found in inputs}
        manifest = Manifest(key.stage, key.digest, str(self.path(key)), wall_s, tokens, summary,
                            outputs, time.time(), running_provenance(), read)
        write_json_atomic(self.path(key) / MANIFEST, manifest.to_json())
        return manifest

    @contextmanager
    def locked(self, stage_id: str, shared: bool = False) -> Iterator[None]:
        """Hold a stage's lock, `stages/.locks/<stage id>.lock` (`stage_id` is the folder's
        name; the locks live apart so `stages/distill-x-*` globs match only stage folders):
        exclusive while running or replacing the stage, shared while reading it as an input.
        A build that finds it held waits (builder.store.file_lock: what survives a kill, and NFS)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(lock_path(self.root / stage_id), shared, f"{stage_id}: another build holds it"):
            yield

    def reusable(self, key: StageKey, replaces: float | None = None) -> Manifest | None:
        """The stage's manifest if it is finished, intact and not the finish `replaces`
        (the one a build decided to redo); call it holding the stage's lock."""
        manifest = self.manifest(key)
        if manifest is None or manifest.finished_at == replaces or manifest.damage() is not None:
            return None
        return manifest

    def discard(self, key: StageKey) -> None:
        """Remove a stage's folder (hold its exclusive lock). It is first renamed into the
        trash, one atomic step, so nobody ever sees a half-deleted stage as resumable."""
        if not self.path(key).exists():
            return
        trash = self.root / TRASH / f"{key.dirname}.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(key), trash)
        for old in trash.parent.iterdir():  # this one, and any a killed build left behind
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(stage_dir: Path) -> Manifest | None:
    """The manifest of the stage in `stage_dir`; None when it has not finished."""
    file = Path(stage_dir) / MANIFEST
    if not file.exists():
        return None
    try:
        return Manifest.from_json(json.loads(file.read_text()))
    except (ValueError, TypeError) as error:  # damaged by hand or by the disk: not finished
        log.warning("%s is unreadable (%s); the stage counts as unfinished", file, error)
        return None


def mark_damaged(stage_dir: Path, name: str, fault: str, found_by: str) -> None:
    """Note in a finished stage's folder that its output `name` (relative) is damaged: the
    reuse check, which reads no file whole, then sees it and the stage is redone. Redoing
    the stage starts from an empty folder, which removes the mark."""
    write_json_atomic(Path(stage_dir) / DAMAGED, {"file": name, "fault": fault, "found_by": found_by,
                                                  "at": time.time()})


def damage_mark(stage_dir: Path) -> tuple[str, str] | None:
    """(relative name, fault) from a stage's DAMAGED mark, if one was left."""
    try:
        mark = json.loads((Path(stage_dir) / DAMAGED).read_text())
        return mark["file"], f"{mark['fault']} (found by {mark['found_by']})"
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # a mark cut short is still a mark
        return DAMAGED, "marked damaged by a reader (its mark is unreadable)"


def lock_path(stage_dir: Path) -> Path:
    """The file StageStore.locked locks for the stage in `stage_dir`."""
    return stage_dir.parent / LOCKS / f"{stage_dir.name}.lock"


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write a temporary file in the same folder, fsync, rename it over `path`, fsync the
    folder: after a crash `path` holds either the old content or the new, never a part; after
    a failed write (a full disk) neither `path` changes nor a temporary stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")  # one writer per process
    with removed_on_failure(tmp), open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
