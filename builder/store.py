"""Content-addressed stage outputs.

Every stage writes into `<workdir>/stages/<stage>-<hash>/`, where the hash covers the
stage's spec section, its upstream hashes and the code version. The stage's
`manifest.json` is written last, atomically: its existence means the stage finished, so a
finished stage is never recomputed, and a directory without one is a stage that was
interrupted (long stages keep resumable checkpoints inside it).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CODE_VERSION = "0.1.3"  # bump when a stage's outputs change meaning; it is part of every hash


@dataclass(frozen=True)
class StageKey:
    stage: str  # e.g. "distill"
    label: str  # human part of the directory name, e.g. the student's name
    config: dict[str, Any]  # the spec section this stage reads, JSON-able
    upstream: tuple[str, ...] = ()  # hashes of the stages it reads

    @property
    def digest(self) -> str:
        payload = {"stage": self.stage, "config": self.config, "upstream": list(self.upstream),
                   "code": CODE_VERSION}
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

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class StageStore:
    def __init__(self, workdir: Path):
        self.root = Path(workdir).resolve() / "stages"

    def path(self, key: StageKey) -> Path:
        return self.root / key.dirname

    def manifest(self, key: StageKey) -> Manifest | None:
        file = self.path(key) / MANIFEST
        if not file.exists():
            return None
        return Manifest(**json.loads(file.read_text()))

    def prepare(self, key: StageKey) -> Path:
        out = self.path(key)
        out.mkdir(parents=True, exist_ok=True)
        return out

    def finish(self, key: StageKey, wall_s: float, tokens: int, summary: dict[str, Any]) -> Manifest:
        manifest = Manifest(key.stage, key.digest, str(self.path(key)), wall_s, tokens, summary)
        write_json_atomic(self.path(key) / MANIFEST, manifest.to_json())
        return manifest


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write a temporary file in the same folder, fsync, rename it over `path`, fsync the
    folder: after a crash `path` holds either the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")  # one writer per process
    with open(tmp, "wb") as handle:
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
