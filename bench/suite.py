"""Where `make test`'s time goes: the suite run as `make test` runs it (two xdist workers,
loadscope), every test scope's duration, and the CPU time of every process it started,
grouped by kind (Ray Train's processes, Ray's daemons, vLLM, stage tasks, ...).

    .venv/bin/python -m bench.suite            # the whole suite (about 30 minutes on 2 cores)
    .venv/bin/python -m bench.suite --quick    # tests/test_e2e.py and the Llama rehearsal only

Writes bench/results/suite.json (or suite-quick.json). This is the measurement behind
issue 20's "make test under 15 minutes": a scope's seconds say which tests to share or
shorten, the CPU by kind says which start-ups to cut.

The CPU time of each process is sampled once a second (user + system, from /proc through
psutil); a process that ends between two samples loses its last second at most, so the
totals are a slight undercount. Processes alive before the run are left out.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter

import psutil

from bench.common import ROOT, PeriodicSampler, print_table, write_result

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
# `pytest --durations=0` lines: "607.69s call     tests/test_x.py::TestY::test_z[p]"
DURATION = re.compile(r"^(\d+\.\d+)s (setup|call|teardown)\s+(\S+)$", re.M)


def kind_of(command_line: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, command_line):
            return kind
    return "other"


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


class CpuSampler(PeriodicSampler):
    """Every new process's CPU seconds, sampled once a second while the block runs."""

    def __init__(self) -> None:
        super().__init__(every_s=1.0)
        self.before = {self._key(p): self._cpu(p) for p in psutil.process_iter()}
        self.seen: dict[tuple, tuple[float, str]] = {}

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
            cpu = self._cpu(process) - self.before.get(key, 0.0)
            self.seen[key] = (max(cpu, self.seen.get(key, (0.0, ""))[0]), command_line)

    def cpu_of(self, pid: int) -> float:
        """The CPU seconds sampled for the process(es) that had this pid."""
        return sum(cpu for (seen_pid, _), (cpu, _) in self.seen.items() if seen_pid == pid)

    def by_kind(self) -> dict[str, float]:
        totals: Counter[str] = Counter()
        for cpu, command_line in self.seen.values():
            totals[kind_of(command_line)] += cpu
        return {kind: round(seconds, 1) for kind, seconds in totals.most_common()}


def pytest_command(tests: list[str]) -> list[str]:
    """`make test`'s command (Makefile), with every duration printed."""
    return ["tests/loopback_only.sh", sys.executable, "-m", "pytest", "-q", "-rs", "--durations=0",
            "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope", "--no-loadscope-reorder", *tests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK_TESTS)}")
    args = parser.parse_args()
    tests = QUICK_TESTS if args.quick else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MINIZOO_REQUIRE_VLLM": "1"}
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
    print_table(["test scope", "seconds of a worker"], [[scope, round(s, 1)] for scope, s in list(scopes.items())[:25]])
    print(f"\n{summary}; wall {wall / 60:.1f} min, {total_cpu:.0f} CPU-s sampled")
    path = write_result("suite-quick" if args.quick else "suite", {
        "tests": tests or "all", "exit_code": run.returncode, "pytest_summary": summary, "wall_s": round(wall, 1),
        "cpu_s_by_kind": cpu, "cpu_s_sampled": round(total_cpu, 1), "seconds_per_scope": scopes})
    print(f"wrote {path}")
    if run.returncode != 0:
        print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")
        sys.exit(run.returncode)


if __name__ == "__main__":
    main()
