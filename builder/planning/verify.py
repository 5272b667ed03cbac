"""`build-family verify SPEC`: every output of every finished stage of the family's plan, read
whole and compared with the content digest recorded when it was written.

The reuse check before a build reads sizes and headers only (builder.store.integrity), and a
stage checks an input as it reads it (builder.store.content); this reads everything at once,
for a user who wants to know before a build, or after a disk or a copy gave trouble. A damaged
stage gets a DAMAGED mark, so the next build redoes it and every stage that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.planning.dag import Plan
from builder.store.integrity import CONTENT
from builder.store.stage_store import DAMAGED, Manifest, StageStore, damage_mark, mark_damaged


@dataclass(frozen=True)
class Verified:
    """One finished stage after a full check."""

    stage_id: str
    files: int
    size: int  # bytes read
    undigested: int  # files recorded before content digests existed: checked by size and header only
    damage: tuple[str, str] | None = None  # (path, fault) of the first damaged file

    def line(self) -> str:
        if self.damage is not None:
            path, fault = self.damage
            return (f"damaged   {self.stage_id}: {path}: {fault}; marked, so the next build redoes it and "
                    "every stage that reads it")
        older = f" ({self.undigested} recorded before content digests: size and header only)" if self.undigested else ""
        return f"intact    {self.stage_id}: {self.files} files, {self.size / 1e9:.2f} GB{older}"


def verify_stages(plan: Plan, store: StageStore) -> Iterator[Verified]:
    """A full check of each finished stage of `plan`, in plan order, holding its shared lock
    (so no build replaces it mid-read); unfinished stages are left out."""
    for stage_id, stage in plan.stages.items():
        with store.locked(stage_id, shared=True):
            manifest = store.manifest(stage.key)
            if manifest is not None:
                yield _verify(stage_id, manifest)


def _verify(stage_id: str, manifest: Manifest) -> Verified:
    outputs = manifest.outputs or {}
    undigested = sum(CONTENT not in record for record in outputs.values())
    size = sum(record["size"] for record in outputs.values())
    damage = manifest.damage(full=True)
    if damage is not None and damage_mark(Path(manifest.path)) is None:
        mark_damaged(Path(manifest.path), Path(damage[0]).relative_to(manifest.path).as_posix(), damage[1],
                     found_by="build-family verify")
    return Verified(stage_id, len(outputs), size, undigested, damage)


def verify_summary(results: list[Verified]) -> str:
    damaged = [result.stage_id for result in results if result.damage is not None]
    if not results:
        return "no stage of this family has finished: nothing to verify"
    if not damaged:
        return f"all {len(results)} finished stages are intact"
    return (f"{len(damaged)} of {len(results)} finished stages are damaged ({DAMAGED} left in each): run the "
            "build again to redo them and what reads them")
