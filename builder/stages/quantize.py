"""quantize: one quantized variant (spec `variants:`) of one finished model (a student's
distillation, or the teacher the students learned from, as the reference), a compressed-tensors
checkpoint made by llm-compressor in its own environment (builder.models.quantizer_env) and
loaded back here with plain transformers before the stage finishes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from builder.models.arch import count_params
from builder.models.teacher import config_from_json
from builder.models.quantizer_env import QUANTIZER_TOOL, run_quantizer
from builder.models.variants import fp8_serving, group_size_for, variant_bytes, variant_problem
from builder.planning.cost_model import Costs, Disk, StageInputs, Work, config_dtype_bytes, forward_flops_per_token
from builder.spec.schema import FamilySpec, VariantSpec
from builder.spec.shape import Shape
from builder.stages.base import Stage, StageContext, StageKind, StageResult
from builder.store.content import verify_folder

CALIBRATION_FILE = "calibration.safetensors"  # scratch: removed once the quantizer has read it


def stage_config(variant: VariantSpec) -> dict:
    """What a variant stage is hashed with: its scheme's settings and the quantizer's version."""
    return {**variant.settings(), "tool": QUANTIZER_TOOL}


def _variant(config: dict) -> VariantSpec:
    return VariantSpec.model_validate({key: value for key, value in config.items() if key != "tool"})


def checked_source(variant: VariantSpec, source: Path) -> Shape:
    """The finished model a variant is made of, verified (the quantizer or llama.cpp's converter
    reads it in its own process), and its shape, checked against the variant: checked with the
    spec already, but a searched student's shape is known only now."""
    verify_folder(source)
    shape = Shape.of(config_from_json(source / "config.json"))
    problem = variant_problem(variant, shape)
    if problem:
        raise ValueError(problem)
    return shape


def run(ctx: StageContext) -> StageResult:
    variant, source = _variant(ctx.config), ctx.model_dir("model")
    shape = checked_source(variant, source)
    out = ctx.out_dir / "model"
    shutil.rmtree(out, ignore_errors=True)  # a killed attempt's files: the stage starts over, never mixes them in
    calibration, tokens = _write_calibration(ctx, variant)
    request = {"model_dir": str(source), "out_dir": str(out), "scheme": variant.scheme,
               "group_size": group_size_for(variant, shape), "calibration": calibration}
    facts = run_quantizer(request, ctx.out_dir, threads=ctx.options.stage_cpus())
    if calibration:
        Path(calibration).unlink()
    summary = _summary(variant, request, facts, source, out, check_loads(out))
    if variant.scheme == "fp8-dynamic":
        summary["serving"] = fp8_serving(ctx.options.use_gpu)
    return summary, tokens


def _write_calibration(ctx: StageContext, variant: VariantSpec) -> tuple[str | None, int]:
    """The first `calibration_samples` blocks of the family's calibration split, for GPTQ (the
    scheme that reads data): the same split the importance scores come from."""
    if not variant.calibrated:
        return None, 0
    # torch: the token blocks are tensors
    from builder.data.prepare import load_blocks
    from safetensors.torch import save_file

    blocks = load_blocks(ctx.blocks_path(), "calibration", variant.calibration_samples)
    path = ctx.out_dir / CALIBRATION_FILE
    save_file({"input_ids": blocks.contiguous()}, str(path))
    return str(path), int(blocks.numel())


def check_loads(model_dir: Path) -> dict:
    """Load the variant in this (the serving) environment with plain transformers and run one
    forward pass: a checkpoint the main environment cannot read fails its own stage."""
    # torch and transformers: only when the stage runs
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    if not torch.isfinite(logits).all():
        raise ValueError(f"the variant in {model_dir} loads in transformers but its logits are not finite")
    return {"transformers": transformers.__version__, "quantizer": type(model.hf_quantizer).__name__}


def _summary(variant: VariantSpec, request: dict, facts: dict, source: Path, out: Path, loaded: dict) -> dict:
    size, source_size = _weight_bytes(out), _weight_bytes(source)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    settings = {"group_size": request["group_size"], "calibration_blocks": facts["calibration_blocks"]}
    return {"model_dir": str(out), "scheme": variant.scheme, "settings": settings,
            "format": quantization.get("format"), "bytes": size, "source_bytes": source_size,
            "size_ratio": round(size / source_size, 4), "tool": QUANTIZER_TOOL,
            "quantizer_packages": facts["packages"], "quantize_seconds": facts["seconds"], "loads": loaded}


def _weight_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def estimate(config, execution, inputs: StageInputs, costs: Costs, seq_len: int) -> Work:
    """Reads its model, writes the variant (builder.models.variants.variant_bytes); GPTQ runs
    its calibration blocks through the model (counted as forward passes; its per-layer solves
    are small beside them at these block counts)."""
    variant, model = _variant(config), inputs.model
    size = variant_bytes(variant, Shape.of(model), count_params(model), config_dtype_bytes(inputs.teacher_config))
    tokens = variant.calibration_samples * seq_len if variant.calibrated else 0
    return Work(tokens, forward_flops_per_token(model, seq_len) * tokens, costs.stage_start_s,
                inputs.stored_bytes("model"), size, disk=Disk(peak=size, kept=size))


def planned_tokens(spec: FamilySpec, stage: Stage) -> int | None:
    variant = _variant(stage.key.config)
    return variant.calibration_samples * spec.data.seq_len if variant.calibrated else None  # reads no data


KIND = StageKind("quantize", version="1", run=run, resources="heavy",
                 title="a quantized variant (compressed-tensors, by llm-compressor) of the teacher or a student",
                 estimate=estimate, planned_tokens=planned_tokens)
