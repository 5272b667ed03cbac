"""Quantized variants (spec `variants:`, builder.stages.quantize): the spec, its checks against
the teacher and the quantizer's environment, the plan and what each variant stage's hash
follows, the dry run, and one real quantization of a tiny model by llm-compressor in its own
environment (.venv-quantize), loaded back here with plain transformers.

Without .venv-quantize the real quantization skips naming llm-compressor, which
MINIZOO_REQUIRE_QUANTIZER=1 (`make test` sets it) turns into a failure (tests/conftest.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from block_files import write_blocks
from builder.cli import main
from builder.models.quantizer_env import LLMCOMPRESSOR_VERSION, QUANTIZE_VENV_VARIABLE, quantizer_problem
from builder.models.teacher import config_from_json
from builder.models.variants import auto_group_size, fp8_serving, variant_bytes
from builder.options.precision import Precision
from builder.options.run_options import RunOptions
from builder.planning.dag import Plan, make_plan, stage_key
from builder.planning.validate import check_against_teacher
from builder.spec.schema import FamilySpec, VariantSpec
from builder.spec.shape import Shape
from builder.stages.base import Stage, StageContext
from builder.stages.quantize import run as quantize_stage, stage_config
from builder.store.stage_store import Manifest
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = ROOT / "tests" / "data" / "configs" / "SmolLM2-135M-Instruct.json"
FLOAT32 = Precision("float32", "test")
MODELS = ("teacher", "mlp", "depth")  # SmolLM2-135M: hidden 576, MLP 1536, 9 x 64 heads, 3 x 64 kv
SPEC = {
    "family": "tiny",
    "teacher": {"source": "embedded:smollm2-135m-instruct"},
    "distill": {"tokens": "48K", "global_batch_size": 12},
    "students": [{"name": "mlp", "shape": {"intermediate_size": 1024}},
                 {"name": "depth", "shape": {"num_hidden_layers": 17}}],
    "evaluation": {"perplexity_tokens": "4K"},
    "variants": ["w8a8-int8", "w4a16"],
}


def spec(**sections) -> FamilySpec:
    return FamilySpec.model_validate({**SPEC, **sections})


def plan_of(family: FamilySpec) -> Plan:
    return make_plan(family, config_from_json(SMOLLM2_CONFIG), FLOAT32)


def digests(plan: Plan) -> dict[tuple[str, str], str]:
    return {(stage.name, stage.key.label): stage.key.digest for stage in plan.stages.values()}


def changed(before: Plan, after: Plan) -> set[tuple[str, str]]:
    old, new = digests(before), digests(after)
    return {name for name in old.keys() & new.keys() if old[name] != new[name]}


# ----------------------------------------------------------------------------------------
# The spec


def test_a_variant_is_its_scheme_alone_or_a_mapping_with_its_settings():
    family = spec(variants=["fp8-dynamic", {"scheme": "w4a16", "group_size": 64, "calibration_samples": 16}])
    assert [variant.scheme for variant in family.variants] == ["fp8-dynamic", "w4a16"]
    assert family.variants[0].settings() == {"scheme": "fp8-dynamic"}  # reads no data: nothing else hashed
    assert family.variants[1].settings() == {"scheme": "w4a16", "group_size": 64, "calibration_samples": 16}
    assert spec(variants=["w4a16"]).variants[0].group_size == "auto"
    assert FamilySpec.model_validate({k: v for k, v in SPEC.items() if k != "variants"}).variants == []


@pytest.mark.parametrize("variants, says", [
    ([{"scheme": "w8a8-int8", "calibration_samples": 64}], "calibration_samples is read only by scheme w4a16"),
    ([{"scheme": "fp8-dynamic", "group_size": 64}], "group_size is read only by scheme w4a16"),
    (["w4a16", {"scheme": "w4a16", "group_size": 32}], "keep one entry of 'w4a16'"),
    (["nf4"], "'w8a8-int8', 'w4a16', 'fp8-dynamic', 'gguf-q8_0' or 'gguf-q4_k_m'"),
    ([{"scheme": "w4a16", "group_size": 100}], "'auto', 128, 64 or 32"),
])
def test_a_mistaken_variant_is_refused_naming_the_fix(variants, says):
    with pytest.raises(ValidationError) as error:
        spec(variants=variants)
    assert says in str(error.value)


def test_w4a16_needs_widths_vllms_kernels_take_for_every_model():
    """A student 504 wide (not a multiple of 32) can have w8a8 but not w4a16."""
    family = spec(students=[{"name": "width", "shape": {"hidden_size": 504}}], variants=["w8a8-int8", "w4a16"])
    problems = check_against_teacher(family, config_from_json(SMOLLM2_CONFIG))
    assert [(p.field, p.value) for p in problems] == [("variants[1]", "w4a16")]
    assert problems[0].message.startswith("width: w4a16 needs every Linear width to be a multiple of 32")
    assert "hidden_size=504" in problems[0].message and "remove the w4a16 variant" in problems[0].message


def test_an_explicit_group_size_must_divide_every_input_width():
    family = spec(variants=[{"scheme": "w4a16", "group_size": 128}])
    problems = check_against_teacher(family, config_from_json(SMOLLM2_CONFIG))
    assert {p.message.split(":")[0] for p in problems} == set(MODELS)  # 576 % 128 in every one
    assert "use group_size: 64 (the largest that does) or group_size: auto" in problems[0].message
    assert check_against_teacher(spec(variants=[{"scheme": "w4a16", "group_size": 64}]),
                                 config_from_json(SMOLLM2_CONFIG)) == []


def test_auto_takes_the_largest_group_size_dividing_the_models_widths():
    smollm2 = Shape.of(config_from_json(SMOLLM2_CONFIG))
    assert auto_group_size(smollm2) == 64  # hidden 576
    assert auto_group_size(smollm2.replace(hidden_size=1024, num_attention_heads=16, intermediate_size=4096)) == 128
    assert auto_group_size(smollm2.replace(hidden_size=544, num_attention_heads=8, intermediate_size=1056)) == 32
    assert auto_group_size(smollm2.replace(hidden_size=504)) is None


def test_the_cpu_flags_decide_whether_fp8_is_served_at_speed(tmp_path):
    plain, amx = tmp_path / "plain", tmp_path / "amx"
    plain.write_text("flags\t\t: fpu avx2 avx512f\n")
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert fp8_serving(False, plain).startswith("unverified: this CPU has no AMX and no GPU is used")
    assert "this CPU has AMX" in fp8_serving(False, amx)
    assert "compute capability 8.9" in fp8_serving(True, plain)


# ----------------------------------------------------------------------------------------
# The plan: a stage per (model, variant), hashed with what it reads


def quantize_stages(plan: Plan) -> dict[str, Stage]:
    return {stage.key.label: stage for stage in plan.stages.values() if stage.name == "quantize"}


def test_every_model_gets_every_variant_from_its_finished_checkpoint():
    plan = plan_of(spec(correction={"tokens": "4K", "global_batch_size": 4}))
    stages = quantize_stages(plan)
    assert sorted(stages) == sorted(f"{model}.{scheme}" for model in MODELS for scheme in ("w8a8-int8", "w4a16"))
    finished = {"teacher": plan.teacher_stage} | {s.spec.name: s.final_stage for s in plan.students}
    assert plan.stages[plan.teacher_stage].name == "correct"  # the teacher the students learned from
    for (model, scheme), stage_id in plan.variant_stages.items():
        stage = plan.stages[stage_id]
        assert stage.inputs["model"] == finished[model]
        assert ("data" in stage.inputs) == (scheme == "w4a16")  # only GPTQ reads the calibration split
        assert stage.student == (None if model == "teacher" else model)


def test_a_chained_student_gets_its_variants_from_its_own_distillation_checked_at_its_shape():
    """A student cut from another (`from:`) is checked at its own widths: 1024 of its parent's MLP
    cut to 1000, which is no multiple of 32, refuses w4a16 for it alone."""
    chained = SPEC["students"] + [{"name": "small", "from": "mlp", "shape": {"intermediate_size": 1000}}]
    problems = check_against_teacher(spec(students=chained), config_from_json(SMOLLM2_CONFIG))
    assert [(p.field, p.message.split(":")[0]) for p in problems] == [("variants[1]", "small")]
    assert "intermediate_size=1000" in problems[0].message
    chained[-1]["shape"]["intermediate_size"] = 512
    plan = plan_of(spec(students=chained))
    small = next(student for student in plan.students if student.spec.name == "small")
    assert plan.stages[plan.variant_stages[("small", "w8a8-int8")]].inputs["model"] == small.final_stage


def test_a_variant_stage_follows_its_model_and_its_scheme_only():
    before = plan_of(spec())
    # the variant, its evaluation in vLLM, and the throughput run that measures it beside the others
    assert changed(before, plan_of(spec(variants=["w8a8-int8", {"scheme": "w4a16", "calibration_samples": 64}]))) \
        == {(kind, f"{model}.w4a16") for model in MODELS for kind in ("quantize", "evaluate")} | {("throughput", "")}
    # the calibration split moves: the teacher's w4a16 follows it, its w8a8 reads no data and stays
    moved = changed(before, plan_of(spec(data={"split": {"seed": 1}})))
    assert ("quantize", "teacher.w4a16") in moved and ("quantize", "teacher.w8a8-int8") not in moved
    # one student's distillation changes: its variants follow, the other's stay
    students = [{**SPEC["students"][0], "distill": {"tokens": "24K", "global_batch_size": 12}}, SPEC["students"][1]]
    moved = changed(before, plan_of(spec(students=students)))
    assert {("quantize", "mlp.w8a8-int8"), ("quantize", "mlp.w4a16")} <= moved
    assert not {label for name, label in moved if name == "quantize" and not label.startswith("mlp.")}


def test_variants_change_no_other_stage_but_the_throughput_run_that_measures_them_too():
    without, plan = plan_of(spec(variants=[])), plan_of(spec())
    assert {name: digest for name, digest in digests(without).items() if name[0] != "throughput"}.items() \
        <= digests(plan).items()
    assert quantize_stages(without) == {}
    assert set(plan.stages[plan.throughput_stage].inputs) == set(MODELS) | set(quantize_stages(plan))
    assert digests(plan_of(spec(variants=[], throughput={"enabled": False}))).items() \
        <= digests(plan_of(spec(throughput={"enabled": False}))).items()


def test_each_variant_is_evaluated_in_vllm_on_the_familys_tasks_and_heldout_blocks():
    plan = plan_of(spec())
    assert sorted(plan.variant_eval_stages) == sorted(plan.variant_stages)
    for key, stage_id in plan.variant_eval_stages.items():
        stage, member = plan.stages[stage_id], plan.stages[plan.eval_stages[key[0]]]
        assert stage.inputs == {"model": plan.variant_stages[key], "data": member.inputs["data"]}
        assert stage.key.config == member.key.config  # the same tasks, limits and held-out tokens as its member
        assert stage.key.options == {**member.key.options, "engine": "vllm"}


def test_a_variants_evaluation_is_estimated_with_its_vllm_engine_and_its_speed_in_the_throughput_run():
    from builder.planning.cost_model import COSTS
    from builder.planning.estimate import estimate_plan

    plan = plan_of(spec())
    stages = {(stage.name, stage.label): stage for stage in
              estimate_plan(plan, config_from_json(SMOLLM2_CONFIG), RunOptions(workdir=Path("/nonexistent"))).stages}
    member, variant = stages[("evaluate", "teacher")], stages[("evaluate", "teacher.w8a8-int8")]
    assert (variant.tokens, variant.flops) == (member.tokens, member.flops)  # the same tasks and blocks
    assert variant.seconds["start"] - member.seconds["start"] == pytest.approx(COSTS.vllm_start_s)
    without = estimate_plan(plan_of(spec(variants=[])), config_from_json(SMOLLM2_CONFIG),
                            RunOptions(workdir=Path("/nonexistent")))
    measured = {stage.name: stage for stage in without.stages}["throughput"]
    # the three members' work, and each of the six variants' (three models x two schemes): its member's shape
    assert stages[("throughput", "")].flops == pytest.approx(measured.flops * 9 / 3)


def test_the_quantizers_version_is_in_every_variant_hash():
    config = stage_config(VariantSpec(scheme="w8a8-int8"))
    assert config == {"scheme": "w8a8-int8", "tool": f"llmcompressor=={LLMCOMPRESSOR_VERSION}"}
    bumped = {**config, "tool": "llmcompressor==0.15.0"}
    assert stage_key("quantize", "m.w8a8-int8", config).digest != stage_key("quantize", "m.w8a8-int8", bumped).digest


# ----------------------------------------------------------------------------------------
# The dry run and the quantizer's environment, through the CLI


def fake_quantizer_venv(folder: Path, version: str = LLMCOMPRESSOR_VERSION) -> Path:
    """What the spec check reads of the environment: its Python and llm-compressor's dist-info."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("")
    (folder / "lib" / "python3.11" / "site-packages" / f"llmcompressor-{version}.dist-info").mkdir(parents=True)
    return folder


def dry_run(tmp_path: Path, capsys, family: dict) -> tuple[int, str, str]:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(family))
    code = main([str(path), "--dry-run", "--workdir", str(tmp_path / "runs"),
                 "--teacher-config", str(SMOLLM2_CONFIG)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_dry_run_lists_each_variant_stage_with_its_size_on_disk(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(QUANTIZE_VENV_VARIABLE, str(fake_quantizer_venv(tmp_path / "venv")))
    code, out, err = dry_run(tmp_path, capsys, {**SPEC, "variants": ["w8a8-int8", "w4a16", "fp8-dynamic"]})
    assert code == 0, err
    for model in MODELS:
        assert f"[todo]  quantize ({model}.w4a16)" in out
    disk = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.startswith("  quantize-")}
    assert len(disk) == 9
    sizes = {label.split("-", 1)[1].rsplit("-", 1)[0]: float(size) for label, (size, unit) in disk.items()}
    assert all(unit == "MB" for _, unit in disk.values())
    assert sizes["teacher.w4a16"] < sizes["teacher.w8a8-int8"] == sizes["teacher.fp8-dynamic"] < 269  # bf16: 269 MB
    assert sizes["mlp.w4a16"] < sizes["teacher.w4a16"]
    assert "fp8-dynamic variants: unverified" in out


@pytest.mark.parametrize("venv, says", [
    ("missing", "which does not exist; run `make setup` (it creates .venv-quantize with llm-compressor)"),
    ("old", "holds llmcompressor 0.13.0, not 0.14.0.1"),
])
def test_variants_without_the_quantizers_environment_are_a_spec_problem(tmp_path, capsys, monkeypatch, venv, says):
    folder = tmp_path / "venv" if venv == "missing" else fake_quantizer_venv(tmp_path / "venv", "0.13.0")
    monkeypatch.setenv(QUANTIZE_VENV_VARIABLE, str(folder))
    code, out, err = dry_run(tmp_path, capsys, SPEC)
    assert code == 2 and out == ""
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith(f"  - variants: the quantizer's environment {folder}") \
        or problems[0].startswith(f"  - variants: the variants need the quantizer's environment {folder}")
    assert says in problems[0]
    monkeypatch.setenv(QUANTIZE_VENV_VARIABLE, str(tmp_path / "none"))  # a family without variants needs none
    assert dry_run(tmp_path, capsys, {k: v for k, v in SPEC.items() if k != "variants"})[0] == 0


def test_variants_without_vllm_to_serve_them_are_a_spec_problem(tmp_path, capsys, monkeypatch):
    """vLLM evaluates and measures every variant (the engine that serves compressed-tensors, never
    another): without it the spec is refused before anything runs, naming it and its install."""
    monkeypatch.setenv(QUANTIZE_VENV_VARIABLE, str(fake_quantizer_venv(tmp_path / "venv")))
    monkeypatch.setitem(sys.modules, "vllm", None)  # importlib.util.find_spec("vllm") is None: not installed
    code, out, err = dry_run(tmp_path, capsys, SPEC)
    assert code == 2 and out == ""
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith("  - variants: the compressed-tensors variants are evaluated and measured in vLLM")
    assert "install it with `pip install -e '.[vllm" in problems[0]
    assert dry_run(tmp_path, capsys, {k: v for k, v in SPEC.items() if k != "variants"})[0] == 0


# ----------------------------------------------------------------------------------------
# One real quantization: llm-compressor in .venv-quantize, through the stage


@pytest.fixture(scope="module")
def quantizer():
    problem = quantizer_problem()
    if problem:  # the reason names llm-compressor: MINIZOO_REQUIRE_QUANTIZER=1 fails it (tests/conftest.py)
        pytest.skip(f"llm-compressor cannot run: {problem}")


def test_the_stage_makes_a_compressed_tensors_w4a16_that_transformers_loads(tmp_path, quantizer):
    import transformers

    # 64 wide, MLP 128, 4 x 16 heads, 2 x 16 kv: every width a multiple of 32, auto group size 64
    source = save_tiny_checkpoint(tmp_path / "tiny")
    blocks = write_blocks(tmp_path / "data", torch.randint(3, TINY_VOCAB, (12, 32)), split="calibration",
                          vocab_size=TINY_VOCAB)
    variant = VariantSpec(scheme="w4a16", calibration_samples=8)
    stage = Stage(stage_key("quantize", "tiny.w4a16", stage_config(variant)), {"model": "m", "data": "d"})
    inputs = {"model": Manifest("m", "", "", 0.0, summary={"model_dir": str(source)}),
              "data": Manifest("d", "", "", 0.0, summary={"blocks": str(blocks)})}
    out_dir = tmp_path / "stage"
    out_dir.mkdir()
    summary, tokens = quantize_stage(StageContext(stage, spec(), RunOptions(workdir=tmp_path), out_dir, inputs))

    model_dir = Path(summary["model_dir"])
    quantization = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (4, 64) and quantization["ignore"] == ["lm_head"]
    assert (summary["settings"], tokens) == ({"group_size": 64, "calibration_blocks": 8}, 8 * 32)
    assert summary["quantizer_packages"]["llmcompressor"] == LLMCOMPRESSOR_VERSION
    assert summary["quantizer_packages"]["compressed-tensors"] == "0.19.0"  # not the main env's
    assert summary["bytes"] < 0.35 * summary["source_bytes"]  # float32 in, 4-bit Linear weights out
    shape, params = Shape.of(config_from_json(source / "config.json")), summary["loads"]
    estimated = variant_bytes(variant, shape, transformers.AutoModelForCausalLM.from_pretrained(source).num_parameters(),
                              dtype_bytes=4)
    assert abs(estimated - summary["bytes"]) < 0.1 * summary["bytes"]  # the dry run's disk figure holds
    assert sorted(path.name for path in out_dir.iterdir()) == ["model"]  # calibration and request removed

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # the main env's transformers
    assert type(model.hf_quantizer).__name__ == params["quantizer"] == "CompressedTensorsHfQuantizer"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()
