"""gguf: one GGUF variant (spec `variants:` gguf-q8_0, gguf-q4_k_m) of one finished model (a
student's distillation, or the teacher the students learned from, as the reference), made by
llama.cpp's own tools (builder.models.llama_cpp): convert_hf_to_gguf.py to an f16 GGUF, then
llama-quantize. Before the stage finishes the file is served by a real llama-server on 127.0.0.1
and measured there at the family's throughput workload (evaluators.llama_server), beside the f16
file it was made from (its speed-up in llama.cpp), or, with throughput off, made to generate a few
tokens: a file llama.cpp cannot serve fails its own stage."""
from __future__ import annotations

from pathlib import Path

from builder.models.arch import count_params
from builder.models.llama_cpp import GGUF_TYPES, LLAMA_CPP_TOOL, convert, quantize, tensor_types
from builder.models.variants import gguf_bytes, gguf_fallbacks
from builder.planning.cost_model import Costs, Disk, StageInputs, Work
from builder.spec.schema import FamilySpec, ThroughputSpec, VariantSpec
from builder.spec.shape import Shape
from builder.stages.base import Stage, StageContext, StageKind, StageResult
from builder.stages.quantize import checked_source
from evaluators.base import ModelHandle
from evaluators.llama_server import LlamaServer, LlamaServerRun, LlamaServerWorkload
from evaluators.registry import get_evaluator

LOAD_CHECK_TOKENS = 8  # generated when the family measures no throughput


def stage_config(variant: VariantSpec, throughput: ThroughputSpec) -> dict:
    """What a GGUF stage is hashed with: its scheme, llama.cpp's version and the throughput
    workload it is measured at (None when the family measures none)."""
    workload = ({"input_len": throughput.input_len, "output_len": throughput.output_len,
                 "num_prompts": throughput.num_prompts} if throughput.enabled else None)
    return {**variant.settings(), "tool": LLAMA_CPP_TOOL, "throughput": workload}


def _variant(config: dict) -> VariantSpec:
    return VariantSpec.model_validate({"scheme": config["scheme"]})


def run(ctx: StageContext) -> StageResult:
    variant, source = _variant(ctx.config), ctx.model_dir("model")
    shape = checked_source(variant, source)
    threads, quant = ctx.options.stage_cpus(), GGUF_TYPES[variant.scheme]
    for stale in ctx.out_dir.glob("*.gguf"):  # a killed attempt's files: the stage starts over
        stale.unlink()
    unquantized = convert(source, ctx.out_dir / "model-f16.gguf", threads)
    out = quantize(unquantized, ctx.out_dir / f"model-{quant}.gguf", variant.scheme, threads)
    workload, speed = ctx.config["throughput"], {}
    if workload:  # the f16 file too, in the same server on the same CPUs: the speed-up is the variant's own
        evaluator = get_evaluator("llama-server-throughput")
        measured = {name: evaluator.run(ModelHandle(path, f"{ctx.stage.key.label} {name}"),
                                        LlamaServerRun(LlamaServerWorkload(**workload), ctx.out_dir / name, threads),
                                        "cpu")
                    for name, path in (("f16", unquantized), (quant, out))}
        speed = {"llama_server_f16": measured["f16"], "speedup_vs_f16": speedup(measured[quant], measured["f16"])}
        measured = measured[quant]
    else:
        measured = _generates(out, threads, ctx.out_dir)
    source_bytes = unquantized.stat().st_size
    unquantized.unlink()
    size = out.stat().st_size
    return {"gguf_file": str(out), "scheme": variant.scheme, "quantization": quant, "bytes": size,
            "f16_bytes": source_bytes, "size_ratio": round(size / source_bytes, 4), "tool": LLAMA_CPP_TOOL,
            "tensor_types": tensor_types(out), "k_quant_fallbacks": gguf_fallbacks(variant, shape),
            "llama_server": measured, **speed}, 0


def speedup(variant: dict, f16: dict) -> dict:
    """The variant's output tokens/s over the f16 file's, with the ratio's spread (the two rates'
    relative standard deviations added in quadrature)."""
    ratio = variant["output_tokens_per_s"] / f16["output_tokens_per_s"]
    relative = [record["output_tokens_per_s_std"] / record["output_tokens_per_s"] for record in (variant, f16)
                if record["output_tokens_per_s_std"] is not None]
    return {"ratio": round(ratio, 4), "std": round(ratio * sum(r * r for r in relative) ** 0.5, 4) if relative else None}


def _generates(gguf_file: Path, threads: int, work_dir: Path) -> dict:
    with LlamaServer(gguf_file, threads, work_dir / "llama-server.log", context=256) as server:
        answer = server.complete("Hello", LOAD_CHECK_TOKENS)
        build = server.version()
    if answer["tokens_predicted"] != LOAD_CHECK_TOKENS:
        raise ValueError(f"llama-server generated {answer['tokens_predicted']} tokens from {gguf_file}, not "
                         f"{LOAD_CHECK_TOKENS}")
    return {"engine": "llama-server", "server_build": build, "generated_tokens": answer["tokens_predicted"]}


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """Reads its model, writes an f16 GGUF (2 bytes a parameter) and the quantized file
    (builder.models.variants.gguf_bytes), keeps the latter; then the throughput workload in
    llama-server (evaluators.llama_server) for both files when the family measures one."""
    variant, model = _variant(config), inputs.model
    params = count_params(model)
    size = gguf_bytes(variant, Shape.of(model), params)
    measured = Work()
    if config["throughput"]:
        settings = LlamaServerRun(LlamaServerWorkload(**config["throughput"]))
        one = get_evaluator("llama-server-throughput").estimate(settings, model, costs, seq_len)
        measured = Work(2 * one.tokens, 2 * one.flops, 2 * one.start_s)
    return Work(measured.tokens, measured.flops, costs.stage_start_s + measured.start_s, inputs.stored_bytes("model"),
                2 * params + size, disk=Disk(peak=2 * params + size, kept=size))


def planned_tokens(spec: FamilySpec, stage: Stage) -> int | None:
    return None  # reads no data


KIND = StageKind("gguf", version="1", run=run, resources="heavy",
                 title="a GGUF variant (by llama.cpp's converter and llama-quantize, served by llama-server) of the "
                       "teacher or a student",
                 estimate=estimate, planned_tokens=planned_tokens)
