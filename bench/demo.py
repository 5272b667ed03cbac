"""The embedded default family, end to end, against its budget (30 minutes, 12 GiB).

    .venv/bin/python -m bench.demo            # the real demo spec (what `make demo` runs)
    .venv/bin/python -m bench.demo --quick    # the same stages with budgets cut ~10x

Runs `build-family` in a fresh work dir as a subprocess and samples the proportional set
size (PSS: shared pages split between processes, so the sum is honest) of its whole process
tree, Ray's workers and vLLM's engine processes included, every two seconds.
Writes bench/results/demo.json (or demo-quick.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from bench.common import PeriodicSampler, print_table, write_result

SPEC = Path(__file__).parent.parent / "families" / "smollm2-135m.yaml"


def quick_spec(out: Path) -> Path:
    """The demo spec with every budget cut, so the bench finishes in minutes."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["correction"]["tokens"] = "4K"
    spec["distill"]["tokens"] = "6K"
    spec["scoring"]["samples"] = 16
    spec["evaluation"]["tasks"] = [{"name": "arc_easy", "limit": 10}]
    spec["evaluation"]["perplexity_tokens"] = "8K"
    spec["throughput"]["num_prompts"] = 8
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


class TreeMemory(PeriodicSampler):
    """Peak PSS of a process and all its descendants while the block runs."""

    def __init__(self, pid: int, every_s: float = 2.0):
        super().__init__(every_s)
        self.root, self.peak = psutil.Process(pid), 0

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        self.peak = max(self.peak, sum(_pss_bytes(process.pid) for process in processes))


def _pss_bytes(pid: int) -> int:
    """PSS from /proc/PID/smaps_rollup: one line to parse, unlike psutil's full smaps walk,
    so sampling costs the measured build little CPU."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_build(spec: Path, workdir: Path) -> dict:
    command = [str(Path(sys.executable).parent / "build-family"), str(spec), "--workdir", str(workdir)]
    started = time.perf_counter()
    process = subprocess.Popen(command)
    with TreeMemory(process.pid) as memory:
        code = process.wait()
    return {"exit_code": code, "wall_s": time.perf_counter() - started, "peak_pss_gib": memory.peak / 2**30}


def stage_rows(report: dict) -> list[list]:
    rows = []
    for model in [report["teacher"], *report["students"]]:
        for stage, record in (model.get("stages") or {}).items():
            if record:
                rows.append([model["name"], stage, record["tokens"], record["wall_s"], record.get("before_workers_s")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="minizoo-demo-") as tmp:
        spec = quick_spec(Path(tmp) / "quick.yaml") if args.quick else SPEC
        result = run_build(spec, Path(tmp) / "runs")
        family = yaml.safe_load(spec.read_text())["family"]
        report = json.loads((Path(tmp) / "runs" / family / "report.json").read_text())
    print_table(["model", "stage", "tokens", "wall s", "of which before its workers ran"], stage_rows(report))
    print(f"\nexit code {result['exit_code']}, wall {result['wall_s'] / 60:.1f} min, "
          f"peak PSS {result['peak_pss_gib']:.2f} GiB")
    name = "demo-quick" if args.quick else "demo"
    summary = {"spec": str(spec.name), "budget": {"wall_min": 30, "peak_gib": 12}, **result,
               "stages": stage_rows(report),
               "models": {m["name"]: {"params": m.get("params"), "tasks": m["tasks"], "perplexity": m["perplexity"],
                                      "throughput": m.get("throughput")}
                          for m in [report["teacher"], *report["students"]]}}
    print(f"wrote {write_result(name, summary)}")


if __name__ == "__main__":
    main()
