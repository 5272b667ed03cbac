"""Measure one model's generation throughput with vLLM's offline engine, in this process; or
run evaluators (lm-eval, perplexity) on one engine serving it (a quantized variant).

`evaluators.throughput` runs it as a fresh subprocess per model (vLLM spawns its engine
processes, which re-import the main module: this file has the `__main__` guard they need):

    python -m evaluators.vllm_worker REQUEST.json RESULT.json

REQUEST.json is {"model": "<checkpoint dir>", "settings": {ThroughputSettings fields},
"pid_file": "<the caller's record of this worker's process group>"}, and for evaluators
"task": {"kind": "evaluate", "evaluations": "<a pickle of (key, evaluator name, settings)>"}.
RESULT.json is written last and only on success, so its existence means the measurement
completed. A failure exits non-zero; vLLM's engine processes log their errors on stdout,
so the caller keeps stdout and stderr in one log.

Lifetime (see evaluators.process_tree): the worker leads its own process group, which
vLLM's engine processes join. When the caller dies (even by SIGKILL) the kernel sends the
worker SIGTERM, and the worker unlinks the group's shared memory and kills the group,
itself included; each engine process gets SIGKILL when the worker dies, whatever kills it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import statistics
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.base import ModelHandle
from evaluators.process_tree import (PidFile, die_with_parent, die_with_parent_from_env, group_members, kill_group,
                                     libc_prctl, mapped_shm)
from evaluators.registry import get_evaluator
from evaluators.throughput import ThroughputSettings, cpu_list_string, vllm_version
from evaluators.vllm_engine import lm_eval_vllm

REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# A pass that kept fewer than this share of its cores busy lost them to other work.
_BUSY_SHARE = 0.75
# A 1-minute load average above this many runnable tasks per core means others were running.
_LOAD_PER_CORE = 1.5


_PARENT_POLL_S = 1.0


def measure(model: Path, settings: ThroughputSettings, engine_started=lambda: None) -> dict[str, Any]:
    """Start an engine for `model`, generate the random workload `settings.warmup_passes`
    times untimed, then `settings.passes` times timed, and return the numbers:

    output_tokens_per_s, requests_per_s, total_tokens_per_s (input + output): means over
    the timed passes, with output_tokens_per_s_std (sample standard deviation) and the
    per-pass values in pass_results; elapsed_s (all timed passes), engine_start_s (the
    `vllm.LLM(...)` call), passes, num_prompts, input_tokens and output_tokens (per pass),
    cpu_per_wall (mean), load (cores_given, cpu_per_wall, load_avg_1m_max, contended, note),
    prompts_sha256, engine_args (as passed to vllm.LLM), settings, vllm_version, hardware,
    warnings, kv_cache_tokens (as the engine sized its cache, where this process sees it) and
    model_dtype (what the weights and KV cache are held in, "auto" resolved).
    """
    import vllm
    from vllm.platforms import current_platform

    engine_args = _engine_args(model, settings, on_cpu=current_platform.is_cpu())
    started = time.perf_counter()
    llm = vllm.LLM(**engine_args)
    engine_start_s = time.perf_counter() - started
    engine_started()

    prompts = random_prompts(_vocab(llm), settings.num_prompts, settings.input_len, settings.seed)
    _check_fits(llm, settings)
    for _ in range(settings.warmup_passes):  # the timed passes should not pay one-off setup
        _generate(llm, prompts, settings.output_len)
    passes = [_rates(_timed_generate(llm, prompts, settings.output_len), settings.num_prompts)
              for _ in range(settings.passes)]
    hardware = _hardware(current_platform)
    return {
        **summarize_passes(passes, cores_given=len(os.sched_getaffinity(0)), on_cpu=hardware["device"] == "cpu"),
        "engine_start_s": engine_start_s,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "engine_args": engine_args,
        "settings": settings.to_json(),
        "vllm_version": _vllm_version(),
        "hardware": hardware,
        "warnings": _warnings(llm, hardware),
        "kv_cache_tokens": _kv_cache_tokens(llm),
        "model_dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
    }


def _kv_cache_tokens(llm: Any) -> int | None:
    """The tokens vLLM's KV cache holds, as its engine sized it (None where this process
    cannot see it: the engine core's own process keeps the number)."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size if cache.num_gpu_blocks else None


def evaluate(model: Path, settings: ThroughputSettings, evaluations: Path, engine_started=lambda: None) -> dict:
    """Run the evaluators listed in `evaluations` (a pickle, by evaluators.in_vllm, of
    (summary key, evaluator name, its settings) in order) on one vLLM engine serving `model`,
    made from `settings` as the throughput measurement makes it (its dtype, seed, engine_args,
    KV cache); lm-eval and perplexity share it (evaluators.vllm_engine). Returns
    {key: the evaluator's record} and "engine": {vllm_version, engine_args, hardware}."""
    from vllm.platforms import current_platform

    engine_args = _engine_args(model, settings, on_cpu=current_platform.is_cpu())
    handle = ModelHandle(model, dtype=settings.dtype, engine_args=engine_args)
    lm_eval_vllm(handle)  # started before the first evaluator, so its shared memory is recorded at once
    engine_started()
    summary = {key: get_evaluator(name).run(handle, evaluator_settings, current_platform.device_type)
               for key, name, evaluator_settings in pickle.loads(evaluations.read_bytes())}
    return {**summary, "engine": {"vllm_version": _vllm_version(), "engine_args": engine_args,
                                  "hardware": _hardware(current_platform)}}


def random_prompts(vocab: list[int], num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """Seeded random token ids: the same prompts for every model with the same tokenizer.

    Token ids go straight to the engine (no decode and re-encode), so every prompt has
    exactly input_len tokens.
    """
    rng = np.random.default_rng(seed)
    return np.asarray(vocab)[rng.integers(0, len(vocab), size=(num_prompts, input_len))].tolist()


def _vocab(llm: Any) -> list[int]:
    """Ids both the tokenizer and the model know, without special tokens (as vLLM's bench);
    every id of the model's vocabulary for an engine without a tokenizer
    (`skip_tokenizer_init`: a shape measured from its config alone, builder.stages.measure_serving)."""
    if llm.llm_engine.model_config.skip_tokenizer_init:
        return list(range(llm.llm_engine.model_config.get_vocab_size()))
    tokenizer = llm.get_tokenizer()
    size = min(tokenizer.vocab_size, llm.llm_engine.model_config.get_vocab_size())
    special = set(tokenizer.all_special_ids)
    return [i for i in range(size) if i not in special]


def _engine_args(model: Path, settings: ThroughputSettings, on_cpu: bool) -> dict[str, Any]:
    args = {"model": str(model), "dtype": settings.dtype, "seed": settings.seed, **settings.engine_args}
    if on_cpu:
        # vLLM's default CPU sizing reserves a fraction of all memory and fails on small or
        # shared machines; an explicit size also skips its sizing warm-up pass.
        args.setdefault("kv_cache_memory_bytes", int(settings.kv_cache_gib * 2**30))
    return args


def _check_fits(llm: Any, settings: ThroughputSettings) -> None:
    max_len = llm.llm_engine.model_config.max_model_len
    if settings.input_len + settings.output_len > max_len:
        raise ValueError(
            f"input_len + output_len = {settings.input_len + settings.output_len} exceeds the "
            f"model's max_model_len {max_len}: shorten them, or raise engine_args['max_model_len'] "
            "if the model supports longer sequences")


def _generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def _timed_generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """Generate once, timing wall clock and the CPU time of this process and its engine.

    CPU seconds over wall seconds is how many cores the engine really had: far below the
    cores it was given means another job was competing for them (the machine is shared).
    """
    load_before = os.getloadavg()[0]
    cpu_before = _tree_cpu_seconds()
    started = time.perf_counter()
    outputs = _generate(llm, prompts, max_tokens)
    elapsed = time.perf_counter() - started
    cpu = _tree_cpu_seconds() - cpu_before
    return {"elapsed_s": elapsed, "cpu_seconds": cpu, "cpu_per_wall": cpu / elapsed,
            "load_avg_1m": max(load_before, os.getloadavg()[0]),
            "input_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)}


def summarize_passes(passes: list[dict[str, float]], cores_given: int, on_cpu: bool) -> dict[str, Any]:
    """Means over the timed passes, the spread of the headline rate, and the machine's load."""
    rates = [p["output_tokens_per_s"] for p in passes]
    mean = {key: statistics.fmean(p[key] for p in passes)
            for key in ("output_tokens_per_s", "requests_per_s", "total_tokens_per_s", "cpu_per_wall")}
    return {**mean, "output_tokens_per_s_std": statistics.stdev(rates) if len(rates) > 1 else None,
            "passes": len(passes), "pass_results": passes, "num_prompts": passes[0]["num_prompts"],
            "input_tokens": passes[0]["input_tokens"], "output_tokens": passes[0]["output_tokens"],
            "elapsed_s": sum(p["elapsed_s"] for p in passes), "cpu_seconds": sum(p["cpu_seconds"] for p in passes),
            "load": machine_load(passes, cores_given, on_cpu)}


def machine_load(passes: list[dict[str, float]], cores_given: int, on_cpu: bool) -> dict[str, Any]:
    """Whether other work competed with the measurement, and how we know.

    On a CPU the engine should keep the cores it was given busy, so a pass whose CPU time
    over wall time falls below _BUSY_SHARE of them lost cores to someone else; on any
    device, a load average above _LOAD_PER_CORE per core means others were running.
    """
    busy = min(p["cpu_per_wall"] for p in passes)
    load = max(p["load_avg_1m"] for p in passes)
    reasons = []
    if on_cpu and busy < _BUSY_SHARE * cores_given:
        reasons.append(f"a timed pass kept only {busy:.2f} of its {cores_given} cores busy")
    if load > _LOAD_PER_CORE * (os.cpu_count() or 1):
        reasons.append(f"the 1-minute load average reached {load:.1f} on {os.cpu_count()} cores")
    return {"cores_given": cores_given, "cpu_per_wall": statistics.fmean(p["cpu_per_wall"] for p in passes),
            "cpu_per_wall_min": busy, "load_avg_1m_max": load, "contended": bool(reasons),
            "note": "; ".join(reasons) or None}


def _tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (vLLM's engine)."""
    import psutil  # a vLLM dependency

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _rates(timing: dict[str, float], num_prompts: int) -> dict[str, float]:
    elapsed = timing["elapsed_s"]
    return {"requests_per_s": num_prompts / elapsed,
            "output_tokens_per_s": timing["output_tokens"] / elapsed,
            "total_tokens_per_s": (timing["input_tokens"] + timing["output_tokens"]) / elapsed,
            "num_prompts": num_prompts, **timing}


def _vllm_version() -> str:
    found = vllm_version()
    if found:
        return found
    import vllm

    return f"vllm=={vllm.__version__}"


def _hardware(current_platform: Any) -> dict[str, Any]:
    if current_platform.is_cpu():
        return {"device": "cpu", "cpu_model": _cpu_model(), "cpu_flags": _cpu_flags(),
                "logical_cpus": os.cpu_count(),
                "usable_cpus": cpu_list_string(os.sched_getaffinity(0)),
                "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"device": current_platform.device_type, "gpu_name": current_platform.get_device_name(0),
            "gpu_count": count}


def _warnings(llm: Any, hardware: dict[str, Any]) -> list[str]:
    """What makes these numbers unrepresentative, for whoever reads the report."""
    found = []
    dtype = str(llm.llm_engine.model_config.dtype)
    if hardware["device"] == "cpu" and dtype == "torch.bfloat16" and not (
            {"avx512_bf16", "amx_bf16"} & set(hardware["cpu_flags"])):
        found.append("bfloat16 on a CPU without avx512_bf16 or amx_bf16: its matmuls are "
                     "emulated, several times slower than float32; measure with dtype='float32'")
    return found


def _cpu_flags() -> list[str]:
    """The vector extensions that decide CPU speed, bf16 above all: without avx512_bf16 or
    amx_bf16, bfloat16 matmuls are emulated and several times slower than float32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in REPORTED_CPU_FLAGS if flag in flags]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stop_group(*_: object) -> None:
    """Unlink the shared memory of this worker's process group and kill the group (this
    process included): what the worker does when its caller is gone."""
    kill_group(os.getpgrp())


def _stop_when_orphaned(parent: int) -> None:
    """A second watch on the caller, for when the SIGTERM handler cannot run: Python runs
    signal handlers on the main thread only, which may sit in a long call into C."""
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    stop_group()


def _engines_die_with_this_process() -> None:
    """Each engine process vLLM forks (its default on CPU) or spawns gets SIGKILL when this
    process dies. vLLM starts them from the main thread, which lives as long as this process,
    so the death signal (which follows the forking thread) means this process's death; forks
    from other threads are left alone, their thread may end first."""
    state = {}
    libc_prctl()  # looked up here, not in the forked child
    os.register_at_fork(before=lambda: state.update(main=threading.current_thread() is threading.main_thread()),
                        after_in_child=lambda: die_with_parent() if state.get("main") else None)


def _record_shared_memory(pid_file: str | None) -> None:
    """Add the engine's /dev/shm segments to the caller's pid file: if the whole tree is
    killed at once, the next run still knows what to unlink."""
    if pid_file:
        PidFile(Path(pid_file)).add_shm(mapped_shm(group_members(os.getpgrp())))


def _stop_with_caller() -> None:
    """The caller's thread that started this process waits for it until it ends: that thread
    ends early only if the caller dies, which is when this process (and its group) must go."""
    signal.signal(signal.SIGTERM, stop_group)
    die_with_parent_from_env(signal.SIGTERM)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m evaluators.vllm_worker REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    _stop_with_caller()
    _engines_die_with_this_process()
    request_path, result_path = map(Path, argv)
    request = json.loads(request_path.read_text())
    model, settings = Path(request["model"]), ThroughputSettings(**request["settings"])
    started = lambda: _record_shared_memory(request.get("pid_file"))  # noqa: E731
    task = request.get("task") or {"kind": "throughput"}
    if task["kind"] == "evaluate":
        result = evaluate(model, settings, Path(task["evaluations"]), engine_started=started)
    else:
        result = measure(model, settings, engine_started=started)
    partial = result_path.with_suffix(".tmp")
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(result_path)  # written last: its existence means success
    return 0


if __name__ == "__mp_main__":  # an engine process vLLM spawned (re-imports this module)
    die_with_parent()
if __name__ == "__main__":
    status = main(sys.argv[1:])
    # The result is on disk. vLLM's own shutdown at exit takes seconds, even for a tiny
    # model, and adds nothing: the caller kills this process group and unlinks its
    # shared memory (evaluators.process_tree) as soon as this process ends.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
