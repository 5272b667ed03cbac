"""Where `make test`'s time goes: the suite run as `make test` runs it (two xdist workers,
loadscope), every test scope's duration, and the CPU time of every process it started,
grouped by kind (Ray Train's processes, Ray's daemons, vLLM, stage tasks, ...) and by what
each process was, with how many started (gcs_server: Ray instances; TrainController: Ray
Train runs; evaluators.vllm_worker: vLLM engines).

    .venv/bin/python -m bench.suite            # the whole suite (about 30 minutes on 2 cores)
    .venv/bin/python -m bench.suite --quick    # tests/test_e2e.py and the Llama rehearsal only

Writes bench/results/suite.json (or suite-quick.json). This is the measurement behind
issue 20's "make test under 15 minutes": a scope's seconds say which tests to share or
shorten, the CPU by kind and by process says which start-ups to cut.

The CPU time of each process is sampled once a second (user + system, from /proc through
psutil); a process that ends between two samples loses its last second at most, so the
totals are a slight undercount. Processes alive before the run count only the CPU time
they spent during it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import ROOT, PeriodicSampler, print_table, write_result
from builder.stages.registry import STAGE_KINDS

QUICK_TESTS = ["tests/test_e2e.py", "tests/test_rehearse.py::TestLlamaRehearsal"]
# The kind of a process, from the last command line it showed (a Ray worker renames itself
# "ray::<task or actor>" and ends as "ray::IDLE"); the first pattern that matches wins.
KINDS = (
    ("Ray Train's processes", r"ray::(RayTrainWorker|TrainController|PlacementGroupCleaner|DatasetManager"
                              r"|SynchronizationActor|PreemptionWatcher)"),
    ("Ray Data's and runtime-env actors", r"ray::(_AutoscalingCoordinator|_StatsActor|ActorLocationTracker"
                                          r"|MapWorker|ReadDocument|RuntimeEnv)"),
    ("Ray's daemons", r"raylet|gcs_server|dashboard|Dashboard|log_monitor|monitor\.py"),
    ("vLLM", r"vllm|VLLM::"),
    ("the teach pool", r"ray::(ShardTeacher|Teacher)"),
    ("stage tasks (Ray workers)", r"ray::"),
    ("builds in their own process (CLI)", r"builder\.cli|build-family"),
    ("pytest and its workers", r"pytest"),
)
IDLE = "ray::IDLE"  # what a Ray worker shows between tasks
# `pytest --durations=0` lines: "607.69s call     tests/test_x.py::TestY::test_z[p]"
DURATION = re.compile(r"^(\d+\.\d+)s (setup|call|teardown)\s+(\S+)$", re.M)


def kind_of(command_line: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, command_line):
            return kind
    return "other"


def split_names(names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """A process's names as (a Ray worker's tasks and actors, its other names, its "ray::IDLE"s),
    each in the order shown: the tasks say what a Ray worker was, not the command line it
    started with (whose arguments name the raylet) nor the IDLE it ends as."""
    tasks = [name for name in names if name.startswith("ray::") and not name.startswith(IDLE)]
    others = [name for name in names if not name.startswith("ray::")]
    return tasks, others, [name for name in names if name.startswith(IDLE)]


def kind_of_process(names: list[str], parent_names: list[str] = ()) -> str:
    """A process's kind: that of its first task or actor, else of its first other name with a
    kind; a process no name places (vLLM's engine processes start as "multiprocessing.spawn
    ...") takes its parent's kind."""
    tasks, others, idle = split_names(names)
    kinds = [kind_of(name) for name in tasks + others + idle]
    placed = [kind for kind in kinds if kind != "other"]
    if placed:
        return placed[0]
    return kind_of_process(list(parent_names)) if parent_names else "other"


def process_name(names: list[str]) -> str:
    """What a process was, for the table by process: a Ray worker's first task or actor (a
    stage's task by its kind, an actor by its class), else its program and module or script
    as it last showed them."""
    tasks, others, idle = split_names(names)
    ray_names = tasks or ([] if others else idle)
    if ray_names:
        task = ray_names[0].split()[0].removeprefix("ray::")
        kind = next((kind for kind in STAGE_KINDS if task.startswith(f"{kind}-")), None)
        return f"ray::{kind} (a stage)" if kind else f"ray::{task.split('.')[0]}"
    words = others[-1].split() if others else []
    program = Path(words[0]).name if words else "?"
    if "-m" in words[:-1]:
        return f"{program} -m {words[words.index('-m') + 1]}"
    script = next((Path(w).name for w in words[1:] if w.endswith(".py")), None)
    return f"{program} {script}" if script else program


def scope_of(test_id: str) -> str:
    """What xdist's loadscope runs whole on one worker: the module, or its class."""
    module, _, rest = test_id.partition("::")
    first = rest.split("::")[0]
    return f"{module}::{first}" if "::" in rest and first[:1].isupper() else module


def seconds_per_scope(pytest_output: str) -> dict[str, float]:
    totals: Counter[str] = Counter()
    for seconds, _, test_id in DURATION.findall(pytest_output):
        totals[scope_of(test_id)] += float(seconds)
    return dict(totals.most_common())


@dataclass
class Seen:
    """One process as the samples saw it: its CPU seconds, the names it showed (in order,
    each once), and its parent (its key), whose names are looked up once sampling is over:
    a child may be sampled before its parent in the same pass."""

    cpu_s: float = 0.0
    names: list[str] = field(default_factory=list)
    parent: tuple | None = None


class CpuSampler(PeriodicSampler):
    """Every new process's CPU seconds and names, sampled once a second while the block runs."""

    MAX_NAMES = 8  # a Ray worker may run many tasks; the first few say what it was

    def __init__(self) -> None:
        super().__init__(every_s=1.0)
        self.before = {self._key(p): self._cpu(p) for p in psutil.process_iter()}
        self.seen: dict[tuple, Seen] = {}

    @staticmethod
    def _key(process: psutil.Process) -> tuple:
        try:
            return process.pid, process.create_time()
        except psutil.Error:
            return process.pid, None

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    def sample(self) -> None:
        for process in psutil.process_iter():
            key = self._key(process)
            try:
                command_line = " ".join(process.cmdline()) or process.name()
            except psutil.Error:
                continue
            seen = self.seen.get(key)
            if seen is None:
                seen = self.seen[key] = Seen(parent=self._parent_key(process))
            seen.cpu_s = max(seen.cpu_s, self._cpu(process) - self.before.get(key, 0.0))
            if command_line not in seen.names and len(seen.names) < self.MAX_NAMES:
                seen.names.append(command_line)

    def _parent_key(self, process: psutil.Process) -> tuple | None:
        try:
            parent = process.parent()
        except psutil.Error:
            return None
        return self._key(parent) if parent else None

    def parent_names(self, seen: Seen) -> list[str]:
        parent = self.seen.get(seen.parent) if seen.parent else None
        return parent.names if parent else []

    def cpu_of(self, pid: int) -> float:
        """The CPU seconds sampled for the process(es) that had this pid."""
        return sum(seen.cpu_s for (seen_pid, _), seen in self.seen.items() if seen_pid == pid)

    def by_kind(self) -> dict[str, float]:
        totals: Counter[str] = Counter()
        for seen in self.seen.values():
            totals[kind_of_process(seen.names, self.parent_names(seen))] += seen.cpu_s
        return {kind: round(seconds, 1) for kind, seconds in totals.most_common()}

    def by_process(self, top: int = 40) -> dict[str, dict]:
        """The processes by name, most CPU first: how many started and their CPU seconds
        (e.g. gcs_server's count is how many Ray instances ran, TrainController's how many
        Ray Train runs, evaluators.vllm_worker's how many vLLM engines)."""
        cpu, count = Counter(), Counter()
        for seen in self.seen.values():
            name = process_name(seen.names)
            cpu[name] += seen.cpu_s
            count[name] += 1
        return {name: {"count": count[name], "cpu_s": round(seconds, 1)} for name, seconds in cpu.most_common(top)}


def pytest_command(tests: list[str]) -> list[str]:
    """`make test`'s command (Makefile), with every duration printed."""
    return ["tests/loopback_only.sh", sys.executable, "-m", "pytest", "-q", "-rfEs", "--durations=0",
            "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope", "--no-loadscope-reorder", *tests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK_TESTS)}")
    args = parser.parse_args()
    tests = QUICK_TESTS if args.quick else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MINIZOO_REQUIRE_VLLM": "1",
           "MINIZOO_REQUIRE_QUANTIZER": "1",
           "MINIZOO_REQUIRE_LLAMA_CPP": "1"}
    started = time.perf_counter()
    with CpuSampler() as sampler:
        run = subprocess.run(pytest_command(tests), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
    cpu = sampler.by_kind()
    scopes = seconds_per_scope(run.stdout)
    total_cpu = sum(cpu.values())
    print_table(["kind of process", "CPU s", "share"],
                [[kind, seconds, f"{100 * seconds / total_cpu:.1f}%"] for kind, seconds in cpu.items()])
    print()
    processes = sampler.by_process()
    print_table(["process", "started", "CPU s"], [[name, p["count"], p["cpu_s"]] for name, p in processes.items()])
    print()
    print_table(["test scope", "seconds of a worker"], [[scope, round(s, 1)] for scope, s in list(scopes.items())[:25]])
    print(f"\n{summary}; wall {wall / 60:.1f} min, {total_cpu:.0f} CPU-s sampled")
    path = write_result("suite-quick" if args.quick else "suite", {
        "tests": tests or "all", "exit_code": run.returncode, "pytest_summary": summary, "wall_s": round(wall, 1),
        "cpu_s_by_kind": cpu, "processes": processes, "cpu_s_sampled": round(total_cpu, 1), "seconds_per_scope": scopes})
    print(f"wrote {path}")
    if run.returncode != 0:  # what failed (-rfE lists each failure in the summary), and the end of the output
        print(*[line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))],
              run.stdout[-4000:], run.stderr[-2000:], sep="\n")
        sys.exit(run.returncode)


if __name__ == "__main__":
    main()
