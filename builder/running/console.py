"""What a build shows on the console: one line per stage, drawn with `rich`.

On a terminal a live table (state, elapsed, progress bar and ETA where known) redraws in
place; anywhere else (CI logs, a pipe) one plain line per state change, without escape
codes. Everything a stage's processes print goes to its stage.log (builder.store.stage_log), so
this is all the console shows, plus each failure, once, with its cause and that log's
path. A stage whose input failed is shown as skipped, not as a second failure.

The runner reports queued/finished/failed (it learns them from Ray) and calls `tick`
while it waits; that a stage started, and how far a training stage has got, this module
reads from the stage's folder (builder.running.progress), so no Ray actor is involved.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from builder.planning.dag import Plan
from builder.planning.reuse import Decision, current_finishes
from builder.stages.base import Stage
from builder.running.progress import Progress, stage_state, started_since, training_progress
from builder.store.provenance import running_provenance, version_changes
from builder.store.stage_log import stage_log_path
from builder.store.stage_store import Manifest, StageStore
from builder.units import format_count, format_duration

# Ray messages that are routine, not news: Ray Data kills its map actors when a dataset is
# done (acquire-data's tokenizers), and the raylet reports each queued call on them as failed.
ROUTINE_RAY_MESSAGES = ("killed by `ray.kill`",)
STYLES = {"queued": "dim", "running": "cyan", "done": "green", "failed": "bold red", "skipped": "yellow"}


def make_console() -> Console:
    """stdout; off a terminal, wide enough that no line is wrapped into two."""
    console = Console(soft_wrap=False)
    if not console.is_terminal:
        console = Console(width=max(console.width, 400), soft_wrap=True)
    return console


@dataclass
class Row:
    stage: Stage
    state: str = "queued"
    started: float | None = None  # time.monotonic() when the driver saw it start
    wall_s: float | None = None
    progress: Progress | None = None

    def elapsed(self) -> float | None:
        if self.wall_s is not None:
            return self.wall_s
        return time.monotonic() - self.started if self.started is not None else None

    def eta(self) -> float | None:
        """Remaining time at the average rate so far (loading the models included)."""
        elapsed, progress = self.elapsed(), self.progress
        if elapsed is None or progress is None or progress.done <= 0 or self.state != "running":
            return None
        return elapsed * (progress.total - progress.done) / progress.done if progress.done < progress.total else 0.0


class BuildConsole:
    """Observer of one build (see runner.BuildObserver); use as a context manager."""

    def __init__(self, plan: Plan, store: StageStore, console: Console | None = None, ray_log: Path | None = None,
                 live: bool = True):
        self.plan, self.store = plan, store
        self.ray_log = ray_log or store.root.parent / "ray.log"
        self.ray_kinds: set[str] = set()
        self.console = console or make_console()
        # live=False (--verbose): every process's output streams by, which a live table would fight
        self.live_mode = live and self.console.is_terminal
        self.rows: dict[str, Row] = {}
        self.since = time.time()
        self.live: Live | None = None

    def __enter__(self) -> BuildConsole:
        if self.live_mode:
            self.live = Live(console=self.console, get_renderable=self._table, refresh_per_second=4,
                             redirect_stdout=True, redirect_stderr=True)  # stray prints go above the table
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()  # leaves the final table on screen

    # --- runner events ------------------------------------------------------------------

    def queued(self, stage_id: str) -> None:
        self.rows[stage_id] = Row(self.plan.stages[stage_id])

    def finished(self, stage_id: str, manifest: Manifest) -> None:
        row = self.rows[stage_id]
        self._mark_started(row)
        row.state, row.wall_s = "done", manifest.wall_s
        self._say(row, format_duration(manifest.wall_s))

    def failed(self, stage_id: str, error: str) -> None:
        row = self.rows[stage_id]
        if any(self.rows.get(upstream) and self.rows[upstream].state in ("failed", "skipped")
               for upstream in row.stage.inputs.values()):
            # Ray hands a failed input's error on: its cause was printed already, and the
            # end of the build counts the skipped stages (runner.skip_downstream_of_failures)
            row.state = "skipped"
            return
        row.state, row.wall_s = "failed", row.elapsed()
        self._print_failure(row, error)

    def ray_message(self, text: str) -> None:
        """Ray's own message (e.g. a worker killed for lack of memory, then retried): its
        first line here, once per kind, all of it in the family's ray.log."""
        if not text.strip():
            return
        try:
            self.ray_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.ray_log, "a") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text.rstrip()}\n")
            where = f"whole message: {display_path(self.ray_log)}"
        except OSError as error:  # a full disk: Ray's thread calls this, where an error would be a traceback
            where = f"not kept in {display_path(self.ray_log)}: {error.strerror or error}"
        first = text.strip().splitlines()[0]
        kind = re.sub(r"\d+", "#", first)  # "5 worker(s) were killed" and "2 worker(s)": one kind
        if kind in self.ray_kinds or any(routine in text for routine in ROUTINE_RAY_MESSAGES):
            return  # said once already, or routine: ray.log has it
        self.ray_kinds.add(kind)
        first = first if len(first) <= 160 else first[:157] + "..."
        self.console.print(Text.assemble(_clock(), Text("ray     ", style="yellow"), f" {first} ({where})"))

    def tick(self) -> None:
        for row in self.rows.values():
            if row.state == "queued" and started_since(self.store, row.stage, self.since):
                self._mark_started(row)
            if row.state == "running":
                row.progress = training_progress(self.store, row.stage)

    # --- drawing -----------------------------------------------------------------------

    def _mark_started(self, row: Row) -> None:
        if row.state == "queued":
            row.state, row.started = "running", time.monotonic()
            self._say(row)

    def _say(self, row: Row, detail: str = "") -> None:
        """A plain line per state change off a terminal (the live table shows it otherwise)."""
        if not self.live_mode:
            state = Text(f"{row.state:<8}", style=STYLES[row.state])
            self.console.print(Text.assemble(_clock(), state, " ", stage_title(row.stage), f"  {detail}".rstrip()))

    def _print_failure(self, row: Row, error: str) -> None:
        cause = error.strip().splitlines()[-1] if error.strip() else "no error text"
        log = display_path(stage_log_path(self.store.path(row.stage.key)))
        after = f" after {format_duration(row.wall_s)}" if row.wall_s is not None else ""
        message = Text.assemble(_clock(), Text("FAILED  ", style=STYLES["failed"]),
                                f" {stage_title(row.stage)}{after}: {cause}\n", f"{'':18}full log: {log}")
        self.console.print(message)

    def _table(self) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column in ("state", "stage", "elapsed", "progress", "ETA"):
            table.add_column(column)
        for row in self.rows.values():
            table.add_row(Text(row.state, style=STYLES[row.state]), stage_title(row.stage),
                          format_seconds(row.elapsed()), _bar(row.progress), format_seconds(row.eta()))
        return table


def build_header(family: str, decisions: dict[str, Decision], workdir: Path) -> str:
    """`Building F: 5 stages to run (2 damaged), 3 finished earlier (reused); work dir W`: the
    stages counted by the build's own decisions (builder.planning.reuse), so a damaged stage,
    and one whose input runs again, count as to run, however finished they look."""
    run = [decision for decision in decisions.values() if not decision.reuse]
    kinds = {"damaged": "damaged", "resume": "resume from a checkpoint"}
    detail = ", ".join(f"{n} {words}" for state, words in kinds.items()
                       if (n := sum(decision.state == state for decision in run)))
    return (f"Building {family}: {len(run)} stages to run{f' ({detail})' if detail else ''}, "
            f"{len(decisions) - len(run)} finished earlier (reused); work dir {workdir}")


def stage_title(stage: Stage) -> str:
    """`distill smollm2-90m-width`: the stage and its label, without the hash."""
    return f"{stage.name} {stage.key.label}".strip()


def _bar(progress: Progress | None):
    if progress is None:
        return ""
    table = Table.grid(padding=(0, 1))
    table.add_row(ProgressBar(total=progress.total, completed=min(progress.done, progress.total), width=20),
                  f"{progress.fraction:4.0%}")
    return table


def _clock() -> str:
    return time.strftime("%H:%M:%S ")


def format_seconds(seconds: float | None) -> str:
    return "" if seconds is None else format_duration(seconds)


def display_path(path: str | Path) -> str:
    """A path as the user can paste it: relative to the current folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
    except OSError:
        return os.fspath(path)


# --- `build-family status` -----------------------------------------------------------------


def render_status(plan: Plan, store: StageStore) -> str:
    """Every stage's state from the store alone (no Ray): done, stale (finished on an input
    redone or gone since: builder.planning.reuse.current_finishes), running, partial, pending;
    a done stage made with other package versions than this install has says so."""
    current = current_finishes(plan, store)
    rows = [(_state(store, stage, current[stage_id]), stage) for stage_id, stage in plan.stages.items()]
    counts = {state: sum(s == state for s, _ in rows) for state in ("done", "stale", "running", "partial", "pending")}
    title = f"{plan.spec.family}: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    width = max(len(stage_title(stage)) for _, stage in rows)
    lines = [f"  {state:<8} {stage_title(stage):<{width}}  {_status_detail(store, state, stage)}".rstrip()
             for state, stage in rows]
    return "\n".join([title, *lines])


def _state(store: StageStore, stage: Stage, current: Manifest | None) -> str:
    state = stage_state(store, stage)
    return "stale" if state == "done" and current is None else state


def _status_detail(store: StageStore, state: str, stage: Stage) -> str:
    if state == "stale":
        return "finished on an input that was redone or is gone since; the next build runs it again"
    if state == "done":
        manifest = store.manifest(stage.key)
        return _done_detail(manifest) if manifest else ""
    if state == "pending":
        return ""
    progress = training_progress(store, stage)
    trained = (f"{progress.fraction:.0%} ({format_count(progress.done)} of {format_count(progress.total)} tokens)"
               if progress else "")
    if state == "partial":
        return "interrupted" + (f" at {trained}" if trained else "") + "; the next build resumes it"
    return trained + ("; " if trained else "") + f"log {display_path(stage_log_path(store.path(stage.key)))}"


def _done_detail(manifest: Manifest) -> str:
    changes = version_changes(manifest.provenance, running_provenance())
    return f"took {format_seconds(manifest.wall_s)}" + (f"; {changes}" if changes else "")
