"""Quantized variants evaluated in the engine that serves them (issue #24, point 3): a real
w8a8-int8 variant of a tiny seeded model, made by llm-compressor in .venv-quantize through the
quantize stage, evaluated by the evaluate stage in real vLLM (lm-eval's vLLM backend, perplexity
from vLLM's prompt log-probabilities) beside its member in transformers, and measured by the
throughput stage beside it at the same workload.

The member is also evaluated in vLLM by the same stage: on the same weights, vLLM's perplexity
and lm-eval scores must be transformers' own, which is what makes the variant's differences the
quantization's (and the engine's rounding) rather than a different measurement.

Without .venv-quantize or vLLM the module skips naming llm-compressor or vLLM, which
MINIZOO_REQUIRE_QUANTIZER=1 and MINIZOO_REQUIRE_VLLM=1 (`make test`) turn into failures.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from block_files import write_blocks
from builder.models.quantizer_env import quantizer_problem
from builder.options.run_options import RunOptions
from builder.planning.dag import stage_key
from builder.spec.schema import FamilySpec, VariantSpec
from builder.stages.base import Stage, StageContext
from builder.stages.evaluate import run as evaluate_stage
from builder.stages.quantize import run as quantize_stage, stage_config
from builder.stages.throughput import run as throughput_stage
from builder.store.stage_store import Manifest
from evaluators.perplexity import heldout_perplexity
from evaluators.throughput import vllm_available
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.slow  # four vLLM engines and a quantization

# vLLM's CPU attention takes head_dim 32 (not the tiny models' 16); every width a multiple of 32
VLLM_TINY = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
SEQ_LEN, BLOCKS = 32, 8
ENGINE = {"enforce_eager": True, "max_model_len": 256, "distributed_executor_backend": "uni"}
SPEC = {
    "family": "tiny",
    "teacher": {"source": "embedded:smollm2-135m-instruct"},
    "distill": {"tokens": "1K", "global_batch_size": 4},
    "students": [{"name": "mlp", "shape": {"intermediate_size": 1024}}],
    "evaluation": {"tasks": [{"name": "arc_easy", "limit": 12}], "perplexity_tokens": SEQ_LEN * BLOCKS},
    "throughput": {"input_len": 16, "output_len": 16, "num_prompts": 4, "dtype": "float32", "engine_args": ENGINE},
    "variants": ["w8a8-int8"],
}


def context(stage: Stage, out_dir: Path, inputs: dict[str, Manifest], workdir: Path) -> StageContext:
    out_dir.mkdir(parents=True)
    return StageContext(stage, FamilySpec.model_validate(SPEC), RunOptions(workdir=workdir), out_dir, inputs)


def model_manifest(path: Path) -> Manifest:
    return Manifest("m", "", "", 0.0, summary={"model_dir": str(path)})


def evaluate(root: Path, name: str, model: Path, blocks: Path, engine: str | None) -> dict:
    section = FamilySpec.model_validate(SPEC).evaluation
    options = {"precision": "float32"} | ({"engine": engine} if engine else {})
    stage = Stage(stage_key("evaluate", name, section.model_dump(), options=options), {"model": "m", "data": "d"})
    inputs = {"model": model_manifest(model), "data": Manifest("d", "", "", 0.0, summary={"blocks": str(blocks)})}
    return evaluate_stage(context(stage, root / f"evaluate-{name}-{engine}", inputs, root))[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    for problem in (quantizer_problem(), vllm_available()):
        if problem:  # names llm-compressor or vLLM: the REQUIRE variables fail it (tests/conftest.py)
            pytest.skip(problem)
    root = tmp_path_factory.mktemp("variant-eval")
    member = save_tiny_checkpoint(root / "member", **VLLM_TINY)
    generator = torch.Generator().manual_seed(0)
    heldout = torch.randint(3, TINY_VOCAB, (BLOCKS, SEQ_LEN), generator=generator)
    blocks = write_blocks(root / "data", heldout, split="heldout", vocab_size=TINY_VOCAB)

    variant = VariantSpec(scheme="w8a8-int8")
    stage = Stage(stage_key("quantize", "member.w8a8-int8", stage_config(variant)), {"model": "m"})
    quantized = quantize_stage(context(stage, root / "quantize", {"model": model_manifest(member)}, root))[0]
    variant_dir = Path(quantized["model_dir"])

    evaluations = {"transformers": evaluate(root, "member", member, blocks, None),
                   "vllm": evaluate(root, "member", member, blocks, "vllm"),
                   "variant": evaluate(root, "member.w8a8-int8", variant_dir, blocks, "vllm")}
    throughput = FamilySpec.model_validate(SPEC).throughput
    roles = {"teacher": member, "teacher.w8a8-int8": variant_dir}
    stage = Stage(stage_key("throughput", "", throughput.model_dump()), {role: role for role in roles})
    measured = throughput_stage(context(stage, root / "throughput", {r: model_manifest(p) for r, p in roles.items()},
                                        root))[0]
    return {"member": member, "variant": variant_dir, "blocks": heldout, "quantized": quantized,
            "evaluations": evaluations, "throughput": measured}


def test_the_variant_is_a_compressed_tensors_w8a8_checkpoint(built):
    config = json.loads((built["variant"] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    group = config["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["weights"]["type"]) == (8, "int")
    assert (group["input_activations"]["num_bits"], group["input_activations"]["dynamic"]) == (8, True)


def test_vllm_scores_the_same_weights_as_transformers_does(built):
    """The member in vLLM and in transformers, both in float32: the same perplexity up to the
    order of float32 sums (float32's relative resolution is 6e-8; a mean over 248 token NLLs of
    4 layers' sums in another order stays within 1e-6 relative: measured 1.5e-8), and the same
    lm-eval answers on every example."""
    hf, vllm = built["evaluations"]["transformers"], built["evaluations"]["vllm"]
    assert vllm["perplexity"]["tokens"] == hf["perplexity"]["tokens"] == BLOCKS * (SEQ_LEN - 1)
    assert vllm["perplexity"]["nll"] == pytest.approx(hf["perplexity"]["nll"], rel=1e-6)
    # the spread of 8 block means: subtracting their mean leaves fewer significant digits (measured 1.8e-6)
    assert vllm["perplexity"]["nll_stderr"] == pytest.approx(hf["perplexity"]["nll_stderr"], rel=1e-4)
    reference = heldout_perplexity(str(built["member"]), built["blocks"], progress=False)
    assert hf["perplexity"]["nll"] == reference["nll"]  # the stage read the same blocks, in the same order
    hf_arc, vllm_arc = hf["metrics"]["tasks"]["arc_easy"], vllm["metrics"]["tasks"]["arc_easy"]
    assert vllm_arc["samples"] == hf_arc["samples"] == 12
    # 12 examples, each picked by log-likelihoods that agree to float32 rounding: no answer flips
    # unless two choices tie within ~1e-6, so the accuracies agree (acc_norm divides by lengths alike)
    assert {m: vllm_arc["metrics"][m] for m in ("acc", "acc_norm")} == {m: hf_arc["metrics"][m] for m in ("acc", "acc_norm")}
    assert vllm["metrics"]["settings"]["engine"] == "vllm" and "engine" not in hf["metrics"]["settings"]


def test_the_variant_is_evaluated_in_vllm_and_its_quantization_shows(built):
    """int8 weights (per output channel) and int8 activations (per token, at run time) move
    every logit a little: the variant's NLL differs from its member's in the same engine by more
    than the engines differ on the same weights (float32 rounding: at least 1e-6 relative, the
    bound above; measured 6e-6 here), and by less than the issue's 2% W8A8 goal (this random
    model's logits are near uniform, so quantization moves its NLL very little)."""
    variant, member = built["evaluations"]["variant"], built["evaluations"]["vllm"]
    assert variant["engine"]["vllm_version"].startswith("vllm")
    assert variant["engine"]["engine_args"]["dtype"] == "float32"
    assert {k: variant["engine"]["engine_args"][k] for k in ENGINE} == ENGINE
    nll, reference = variant["perplexity"]["nll"], member["perplexity"]["nll"]
    rounding = max(abs(reference - built["evaluations"]["transformers"]["perplexity"]["nll"]), 1e-6 * reference)
    assert rounding < abs(nll - reference) < 0.02 * reference
    assert variant["metrics"]["tasks"]["arc_easy"]["samples"] == 12
    assert variant["placement"]["device"] == "cpu"


def test_the_throughput_stage_measures_the_variant_beside_its_member_at_the_same_workload(built):
    results = built["throughput"]["results"]
    member, variant = results["teacher"], results["teacher.w8a8-int8"]
    assert "error" not in variant, variant.get("error")
    assert variant["prompts_sha256"] == member["prompts_sha256"]  # the same prompts
    assert variant["output_tokens"] == member["output_tokens"] == 4 * 16  # ignore_eos: the same work
    assert variant["ratio_to_teacher"] == pytest.approx(variant["output_tokens_per_s"] / member["output_tokens_per_s"])
