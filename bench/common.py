"""Shared benchmark plumbing: result files, machine description, contention checks.

This machine is shared and noisy, so every timed iteration records its CPU-time/wall
ratio; an iteration whose ratio falls well below the threads it should keep busy was
contended and is dropped from the summary (but kept in the JSON, marked).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
# The embedded teacher, converted from its GGUF once and kept for every benchmark.
TEACHER = "smollm2-135m-instruct"
TEACHER_CACHE = ROOT / "runs" / "cache" / "bench-teacher"
# The ~90M student the distillation benchmarks share: the demo family's width student
# (families/smollm2-135m.yaml), 91.6M parameters.
WIDTH_STUDENT = {"hidden_size": 504, "intermediate_size": 960}


def teacher_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint (converted from its GGUF on first use)."""
    if not (TEACHER_CACHE / "config.json").exists():
        from builder.models.teacher import convert_gguf_teacher

        TEACHER_CACHE.mkdir(parents=True, exist_ok=True)
        convert_gguf_teacher(TEACHER, TEACHER_CACHE)
    return TEACHER_CACHE


def load_teacher(folder: Path):
    """(model in float32, frozen in eval mode; tokenizer)."""
    from transformers import AutoTokenizer

    from builder.models.loading import load_model

    return load_model(folder), AutoTokenizer.from_pretrained(folder)


def sotu_splits(tokenizer, seq_len: int) -> dict:
    """The embedded corpus as {split: blocks [N, seq_len]}, split by document as builds do."""
    from builder.data.documents import iter_documents
    from builder.data.prepare import tokenize_splits
    from builder.spec.schema import DataSpec

    return tokenize_splits(iter_documents(DataSpec()), tokenizer, DataSpec(seq_len=seq_len))


# The CPU features a benchmark's speed depends on: vector widths (avx, avx2, avx512f), native
# bf16 and matrix units (avx512_bf16, amx_bf16, amx_tile: what `--precision auto` looks for),
# fused multiply-add and the SSE4 string ops tokenizers use.
SPEED_FLAG_PREFIXES = ("avx", "amx", "fma", "sse4")


def speed_cpu_flags() -> list[str]:
    """This CPU's flags that bear on speed, sorted; empty where /proc/cpuinfo has none (macOS)."""
    from builder.options.precision import cpu_flags

    return sorted(flag for flag in cpu_flags() if flag.startswith(SPEED_FLAG_PREFIXES))


def machine() -> dict:
    """The CPU (model, cores and the flags its speed depends on), the GPU and torch's build."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": speed_cpu_flags(), "gpu": gpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


@dataclass
class Timing:
    wall_s: float
    cpu_s: float

    @property
    def cpu_ratio(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Stopwatch:
    """Times a block: wall clock, and CPU time of this process and its finished children."""

    timings: list[Timing] = field(default_factory=list)

    @contextmanager
    def measure(self):
        start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
        yield
        self.timings.append(Timing(time.perf_counter() - start_wall, _cpu_seconds() - start_cpu))


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def uncontended(timings: list[Timing], threads: int, tolerance: float = 0.75) -> list[Timing]:
    """Iterations that kept at least `tolerance` x `threads` cores busy; all if none did."""
    kept = [t for t in timings if t.cpu_ratio >= tolerance * threads]
    return kept or timings


class PeriodicSampler:
    """A context manager that calls `sample()` every `every_s` seconds on a daemon thread
    while its block runs, and once more as the block ends (so a short block is sampled at
    least once). Subclasses keep what they sample: a peak, a total."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def code_version() -> dict:
    """The commit the numbers were measured at, and whether the tree had uncommitted changes
    (then the commit alone does not say what code ran)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}  # not a git checkout (an installed package)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "code": code_version(),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(portable_paths(json.dumps(payload, indent=2, default=str)) + "\n")
    return path


def portable_paths(text: str) -> str:
    """Results are committed: this checkout's folder and the temp dir become <repo> and <tmp>,
    so no file names the machine that measured it."""
    import tempfile

    for prefix, name in ((ROOT.resolve(), "<repo>"), (Path(tempfile.gettempdir()).resolve(), "<tmp>")):
        text = text.replace(f'"{prefix}/', f'"{name}/').replace(f'"{prefix}"', f'"{name}"')
    return text


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
