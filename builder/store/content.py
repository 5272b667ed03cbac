"""Readers check what they read: a file a stage reads from a finished stage's folder is hashed
whole (xxh3-128) and compared with the content digest its maker recorded in its manifest,
once per process.

    verify_folder(model_dir)          # before loading a checkpoint: every recorded file in it
    verify_file(shard)                # before memory-mapping a token or signal shard

Reading a checkpoint, or a shard over a run, reads every byte anyway, so the check costs one
hash at memory speed on top of the read (bench/integrity.py). A file whose bytes changed
fails the stage that reads it with a DamagedFile naming the file and the stage that made it,
and leaves a DAMAGED mark in that stage's folder (builder.store.stage_store.mark_damaged): the
next build's reuse check, which never reads a file whole, sees the mark and redoes the stage
and everything that reads it.

A file outside a finished stage's folder (a local teacher folder used in place, a test's
temporary checkpoint, a running stage's own files) or recorded before content digests existed
has no digest to compare with: it is read unchecked.
"""
from __future__ import annotations

from pathlib import Path

from builder.store.integrity import CONTENT, DamagedFile, file_damage
from builder.store.stage_store import MANIFEST, STAGES, Manifest, mark_damaged, read_manifest

# (path, size, mtime_ns, its stage's finish) of every file this process has checked: a file is
# hashed once however often it is opened (a token shard evicted from a reader's map cache and
# opened again), and again if it or its stage changed since.
_verified: set[tuple[str, int, int, float]] = set()
_manifests: dict[Path, tuple[int, Manifest | None]] = {}  # stage folder -> (manifest mtime_ns, manifest)


def verify_file(path: Path | str) -> None:
    """Raise DamagedFile if `path`, an output of a finished stage, no longer has the content
    its stage recorded (and mark that stage damaged); return at once for any other file."""
    path = Path(path).absolute()
    found = _finished_stage_of(path)
    if found is None:
        return
    stage_dir, manifest = found
    name = path.relative_to(stage_dir).as_posix()
    record = (manifest.outputs or {}).get(name)
    if record is None or CONTENT not in record:
        return
    seen = _seen_key(path, manifest)
    if seen in _verified:
        return
    fault = file_damage(path, record, full=True)
    if fault is not None:
        mark_damaged(stage_dir, name, fault, found_by="a stage that read it")
        raise DamagedFile(path, f"{fault}; made by stage {stage_dir.name}, now marked damaged: run the same "
                                f"command again and the build redoes {stage_dir.name} and every stage that reads it")
    _verified.add(seen)


def verify_files(paths) -> None:
    for path in paths:
        verify_file(path)


def verify_folder(folder: Path | str, skip_suffix: tuple[str, ...] = ()) -> None:
    """`verify_file` for every recorded output under `folder` (a checkpoint folder, or a whole
    stage folder), except names ending in `skip_suffix`."""
    folder = Path(folder).absolute()
    found = _finished_stage_of(folder)
    if found is None:
        return
    stage_dir, manifest = found
    prefix = "" if folder == stage_dir else folder.relative_to(stage_dir).as_posix() + "/"
    verify_files(stage_dir / name for name in (manifest.outputs or {})
                 if name.startswith(prefix) and not name.endswith(skip_suffix))


def _finished_stage_of(path: Path) -> tuple[Path, Manifest] | None:
    """The finished stage whose folder (`<workdir>/stages/<stage id>/`) holds `path`."""
    for folder in (path, *path.parents):
        if folder.parent.name == STAGES:
            manifest = _manifest(folder)
            return (folder, manifest) if manifest is not None else None
    return None


def _manifest(stage_dir: Path) -> Manifest | None:
    """The stage's manifest, read again only when it changed (a large stage's runs to MBs)."""
    try:
        stamp = (stage_dir / MANIFEST).stat().st_mtime_ns
    except FileNotFoundError:
        return None
    if _manifests.get(stage_dir, (None,))[0] != stamp:
        _manifests[stage_dir] = (stamp, read_manifest(stage_dir))
    return _manifests[stage_dir][1]


def _seen_key(path: Path, manifest: Manifest) -> tuple[str, int, int, float]:
    try:
        stat = path.stat()
    except FileNotFoundError:  # file_damage says "missing"
        return str(path), -1, -1, manifest.finished_at
    return str(path), stat.st_size, stat.st_mtime_ns, manifest.finished_at
