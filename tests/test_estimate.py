"""The dry run's estimate (builder.estimate): FLOPs checked against the architecture table's
parameter count, memory terms against their definitions, advice against the 80 GB limit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder import family
from builder.acquire import config_from_json
from builder.arch import count_params, student_config
from builder.estimate import (ACCELERATORS, GIB, estimate_plan, fit_advice, forward_flops_per_token,
                              render_estimate, training_memory)
from builder.options import RunOptions
from builder.shape import Shape

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CONFIG = ROOT / "tests" / "data" / "configs" / "Llama-3.1-8B.json"
LLAMA = config_from_json(LLAMA_CONFIG)


def test_forward_flops_are_two_per_matmul_weight_plus_attention():
    """Independent of the formula: every parameter but the embedding lookup and the norms is a
    matmul weight used once per token (2 FLOPs), plus Q K^T and scores x V over the context."""
    shape = Shape.of(LLAMA)
    norms = shape.num_hidden_layers * 2 * shape.hidden_size + shape.hidden_size
    matmul_weights = count_params(LLAMA) - LLAMA.vocab_size * shape.hidden_size - norms
    attention = 4 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * 8192
    assert forward_flops_per_token(LLAMA, 8192) == 2 * matmul_weights + attention


def test_training_memory_terms():
    student = student_config(LLAMA, Shape.of(LLAMA).replace(hidden_size=3072, intermediate_size=9216))
    params = count_params(student)
    ddp = training_memory(student, LLAMA, micro_batch=2, seq_len=1024, workers=8, parallel="ddp")
    fsdp = training_memory(student, LLAMA, micro_batch=2, seq_len=1024, workers=8, parallel="fsdp")
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * params  # fp32 master, grads, two Adam moments
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer == 16 * params / 8
    assert ddp.teacher == fsdp.teacher == 2 * count_params(LLAMA)  # frozen bf16 teacher, replicated
    double = training_memory(student, LLAMA, micro_batch=4, seq_len=1024, workers=8, parallel="ddp")
    assert double.activations == 2 * ddp.activations and double.logits == 2 * ddp.logits
    assert ddp.activations_checkpointed < ddp.activations
    correction = training_memory(LLAMA, None, micro_batch=2, seq_len=1024, workers=8, parallel="ddp")
    assert correction.teacher == 0 and correction.logits < training_memory(
        LLAMA, LLAMA, micro_batch=2, seq_len=1024, workers=8, parallel="ddp").logits


def memory_of(trained, frozen, seq_len):
    return lambda b, workers, parallel: training_memory(trained, frozen, b, seq_len, workers, parallel)


def test_advice_names_the_change_that_fits():
    h100 = ACCELERATORS["h100"]
    options = RunOptions(train_workers=8, parallel="ddp", gpu="h100")
    # 8B trained with DDP: 16 bytes x 8B of state alone exceed 80 GB; FSDP over 8 with micro-batch 1 fits.
    advice = fit_advice(memory_of(LLAMA, None, 8192), 4, options, h100)
    assert advice.startswith("does not fit on 80 GB") and "--parallel fsdp with micro_batch_size 1" in advice
    assert "--parallel" not in fit_advice(memory_of(LLAMA, None, 8192), 4, RunOptions(train_workers=8,
                                          parallel="fsdp"), h100).split("try")[1]
    tiny = student_config(LLAMA, Shape.of(LLAMA).replace(num_hidden_layers=2, intermediate_size=1024))
    assert fit_advice(memory_of(tiny, None, 512), 1, options, h100).startswith("fits on 80 GB")
    # The 141 GB H200 holds what the 80 GB H100 does not (at the same settings).
    ddp_total = memory_of(LLAMA, None, 512)(1, 8, "ddp").total
    assert 80 * 0.9 * GIB < ddp_total < 141 * 0.9 * GIB
    assert fit_advice(memory_of(LLAMA, None, 512), 1, options, ACCELERATORS["h200"]).startswith("fits")


@pytest.fixture(scope="module")
def llama_plan(tmp_path_factory):
    options = RunOptions(workdir=tmp_path_factory.mktemp("estimate"), teacher_config=LLAMA_CONFIG, train_workers=8)
    return family.load_and_plan(ROOT / "families" / "llama-3.1-8b-minitron.yaml", options), options


def test_gpu_hours_follow_flops_peak_and_mfu(llama_plan):
    plan, options = llama_plan
    estimate = estimate_plan(plan, LLAMA, options)
    (correct,) = [stage for stage in estimate.stages if stage.name == "correct"]
    assert correct.tokens == 100_000_000_000 and correct.gpus == 8
    assert correct.flops == 3 * forward_flops_per_token(LLAMA, 8192) * correct.tokens
    assert correct.gpu_hours == pytest.approx(correct.flops / (989e12 * 0.4) / 3600)
    assert correct.wall_hours == pytest.approx(correct.gpu_hours / 8)
    slower = estimate_plan(plan, LLAMA, RunOptions(train_workers=8, mfu=0.2, gpu="a100"))
    assert slower.gpu_hours == pytest.approx(estimate.gpu_hours * 2 * 989 / 312)
    text = "\n".join(render_estimate(estimate))
    assert "40% MFU" in text and "GPU-hours" in text and "does not fit on 80 GB" in text


def test_the_estimate_is_what_report_json_keeps(llama_plan, tmp_path):
    """family.write_family_view hands this to the report (FamilyReport.estimate)."""
    from builder.report_model import FamilyReport

    plan, options = llama_plan
    written = json.loads(json.dumps(estimate_plan(plan, LLAMA, options).to_json()))
    stages = {stage["name"] for stage in written["stages"]}
    assert {"correct", "score", "distill", "evaluate", "throughput"} <= stages
    assert written["gpu_hours"] > 1000 and written["mfu"] == 0.4
    assert FamilyReport.model_fields["estimate"].annotation is not None
