"""Which build the family view describes, and builds taking turns to write it.

`runs/<family>/` holds one view (report.json, report.md, plots/, the cards, precision.json)
shared by every build of the family on that work dir, and two of them can differ: a
float32 and a bfloat16 build have separate training stages (the precision is in their
hash). They take turns (`view_turn`, an flock on `runs/<family>/.view.lock`) rather than
each writing a view of its own named by its precision: one view is what people open and
what `report`, `status` and `publish` read, and a view per build would leave "which one
is current" to the reader. Everything the view says about its build is written in one
turn from one plan, so report.json's `build`, every card, report.md and precision.json
cannot disagree; the last build to write its view wins, and says whose view it replaced.

Two records in the family folder, both {"dtype", "reason", ...}:

    precision.json  part of the view: the build it describes. `report`, `status` and
                    `publish` resolve this build unless --precision names another.
    started.json    the last build to start: what it resolved --precision to, on which
                    machine. `auto` keeps that decision on the same kind of machine (the
                    CPU probe can flip on a loaded machine, and a flip would redo every
                    training stage), and `report` falls back to it before any view exists.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from builder.options.precision import Precision
from builder.report.records import BuildRecord
from builder.store.file_lock import file_lock
from builder.store.stage_store import write_json_atomic

log = logging.getLogger(__name__)

VIEW_LOCK = ".view.lock"
VIEW_PRECISION = "precision.json"
STARTED = "started.json"
KEPT = "; decided by an earlier build on this machine"  # how a kept `auto` decision's reason ends


@contextmanager
def view_turn(family_dir: Path) -> Iterator[None]:
    """Hold the family view: one build (or `report`) at a time reads and writes it."""
    with file_lock(family_dir / VIEW_LOCK, waiting=f"{family_dir}: another build of the family is writing its view"):
        yield


def first_reason(precision: Precision) -> str:
    """Why the precision was chosen, without the note that an earlier build chose it."""
    return precision.reason.removesuffix(KEPT)


def record_view(family_dir: Path, build: BuildRecord) -> None:
    """precision.json for the view being written (call it in the view's turn)."""
    write_json_atomic(family_dir / VIEW_PRECISION,
                      {"dtype": build.precision, "reason": build.precision_reason, "finished_at": build.finished_at})


def view_precision(family_dir: Path) -> Precision | None:
    """The precision of the build the view describes; None before any view was written."""
    record = _read(family_dir / VIEW_PRECISION)
    return Precision(record["dtype"], record["reason"]) if record else None


def write_started(family_dir: Path, precision: Precision, machine: str, serving_hardware: dict | None = None) -> None:
    """started.json: this build's precision, before any stage runs (a killed build resumes with it),
    and the hardware its serving budgets were measured for (builder.stages.measure_serving)."""
    write_json_atomic(family_dir / STARTED, {"dtype": precision.dtype, "reason": first_reason(precision),
                                             "machine": machine, "serving_hardware": serving_hardware})


def started_serving_hardware(family_dir: Path) -> dict | None:
    """The hardware the last build's serving budgets were measured for: `report`, `status` and
    `publish` on another machine (a login node) find that build's measurements, not their own."""
    record = _read(family_dir / STARTED)
    return record.get("serving_hardware") if record else None


def started_precision(family_dir: Path, machine: str | None = None) -> Precision | None:
    """The last build's precision; with `machine`, only if that build ran on this kind of
    machine (then its reason says that an earlier build decided)."""
    record = _read(family_dir / STARTED)
    if record is None or (machine is not None and record.get("machine") != machine):
        return None
    return Precision(record["dtype"], record["reason"] + (KEPT if machine is not None else ""))


def _read(path: Path) -> dict | None:
    """A precision record, or None when it is missing or damaged (then it is decided afresh)."""
    try:
        record = json.loads(path.read_text())
        return record if record.get("dtype") and record.get("reason") else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as error:
        log.warning("%s is unreadable (%s); ignoring it", path, error)
        return None
