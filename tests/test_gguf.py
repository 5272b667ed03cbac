"""GGUF variants (spec `variants:` gguf-q8_0, gguf-q4_k_m; builder.stages.gguf): the spec, its
checks against the teacher and llama.cpp's tools, the plan and what each GGUF stage's hash
follows, the dry run, and real files: a tiny seeded model converted by llama.cpp's
convert_hf_to_gguf.py, quantized by llama-quantize and served by llama-server on 127.0.0.1
(evaluators.llama_server), which generates and is measured, then stopped.

Without llama.cpp's tools (.llama.cpp, built by `make setup`) the real ones skip naming llama.cpp,
which MINIZOO_REQUIRE_LLAMA_CPP=1 (`make test` sets it) turns into a failure (tests/conftest.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from builder.models.llama_cpp import LLAMA_CPP_TOOL, LLAMA_CPP_VARIABLE, llama_cpp_problem
from builder.models.teacher import config_from_json
from builder.models.variants import gguf_bytes, gguf_fallbacks
from builder.options.run_options import RunOptions
from builder.planning.dag import make_plan, stage_key
from builder.planning.validate import check_against_teacher
from builder.spec.schema import FamilySpec, ThroughputSpec, VariantSpec
from builder.spec.shape import Shape
from builder.stages.base import Stage, StageContext
from builder.stages.gguf import run as gguf_stage, stage_config
from builder.store.stage_store import Manifest
from evaluators.base import ModelHandle
from evaluators.llama_server import LlamaServer, LlamaServerRun, LlamaServerThroughput, LlamaServerWorkload
from evaluators.process_tree import group_members
from test_variants import FLOAT32, MODELS, SMOLLM2_CONFIG, SPEC, changed, dry_run, fake_quantizer_venv
from tiny_models import one_thread  # noqa: F401 (autouse fixture)

GGUF_SPEC = {**SPEC, "variants": ["gguf-q8_0", "gguf-q4_k_m"]}


def spec(**sections) -> FamilySpec:
    return FamilySpec.model_validate({**GGUF_SPEC, **sections})


def plan_of(family: FamilySpec):
    return make_plan(family, config_from_json(SMOLLM2_CONFIG), FLOAT32)


def fake_llama_cpp(folder: Path) -> Path:
    """What the spec check reads of llama.cpp's folder: the converter and the two binaries."""
    for path in ("src/convert_hf_to_gguf.py", "build/bin/llama-quantize", "build/bin/llama-server"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text("")
    return folder


# ----------------------------------------------------------------------------------------
# The spec and the plan


def test_gguf_variants_are_schemes_and_take_no_settings():
    family = spec(variants=["gguf-q8_0", {"scheme": "gguf-q4_k_m"}, "w8a8-int8"])
    assert [(v.scheme, v.is_gguf, v.calibrated) for v in family.variants] == [
        ("gguf-q8_0", True, False), ("gguf-q4_k_m", True, False), ("w8a8-int8", False, False)]
    assert family.variants[1].settings() == {"scheme": "gguf-q4_k_m"}
    with pytest.raises(ValidationError, match="group_size is read only by scheme w4a16, not by 'gguf-q4_k_m'"):
        spec(variants=[{"scheme": "gguf-q4_k_m", "group_size": 64}])
    with pytest.raises(ValidationError, match="'gguf-q8_0' or 'gguf-q4_k_m'"):
        spec(variants=["gguf-q5_k_m"])


def test_gguf_needs_input_widths_that_its_32_weight_blocks_divide():
    family = spec(students=[{"name": "width", "shape": {"hidden_size": 504}}])
    problems = check_against_teacher(family, config_from_json(SMOLLM2_CONFIG))
    assert [(p.field, p.value) for p in problems] == [("variants[0]", "gguf-q8_0"), ("variants[1]", "gguf-q4_k_m")]
    assert problems[0].message.startswith("width: gguf-q8_0 needs every Linear's input width to be a multiple of 32")
    assert "hidden_size=504" in problems[0].message and "remove the gguf-q8_0 variant" in problems[0].message


def test_q4_k_m_falls_back_where_256_does_not_divide_a_width_and_the_size_counts_it():
    """SmolLM2's 576-wide hidden state is no multiple of Q4_K's 256-weight super-blocks: accepted (as
    llama.cpp does), with those tensors at Q5_0, so the estimate grows; a 1024-wide model has none."""
    smollm2 = Shape.of(config_from_json(SMOLLM2_CONFIG))
    q4 = VariantSpec(scheme="gguf-q4_k_m")
    assert gguf_fallbacks(q4, smollm2) == {"hidden_size": 576, "num_attention_heads x head_dim": 576}
    assert gguf_fallbacks(VariantSpec(scheme="gguf-q8_0"), smollm2) == {}
    wide = smollm2.replace(hidden_size=1024, num_attention_heads=16, intermediate_size=4096)
    assert gguf_fallbacks(q4, wide) == {}
    params = 134_515_008  # SmolLM2-135M
    # llama-quantize's own files of SmolLM2-135M (llama.cpp b11434): Q8_0 144.8 MB, Q4_K_M 105.5 MB
    assert abs(gguf_bytes(VariantSpec(scheme="gguf-q8_0"), smollm2, params) - 144.8e6) < 0.02 * 144.8e6
    assert abs(gguf_bytes(q4, smollm2, params) - 105.5e6) < 0.03 * 105.5e6


def test_every_model_gets_a_gguf_stage_hashed_with_llama_cpp_and_the_throughput_workload():
    plan = plan_of(spec(variants=["w8a8-int8", "gguf-q8_0"]))
    kinds = {label: stage.name for stage in plan.stages.values()
             for label in [stage.key.label] if stage.name in ("gguf", "quantize")}
    assert kinds == {f"{m}.{s}": k for m in MODELS for s, k in (("w8a8-int8", "quantize"), ("gguf-q8_0", "gguf"))}
    stage = plan.stages[plan.variant_stages[("mlp", "gguf-q8_0")]]
    assert stage.key.config == {"scheme": "gguf-q8_0", "tool": LLAMA_CPP_TOOL,
                                "throughput": {"input_len": 128, "output_len": 128, "num_prompts": 32}}
    assert "data" not in stage.inputs  # reads no calibration data
    # llama.cpp's server measures a GGUF file in its own stage: no vLLM evaluation, not in vLLM's throughput run
    assert {scheme for _, scheme in plan.variant_eval_stages} == {"w8a8-int8"}
    measured = plan.stages[plan.throughput_stage].inputs
    assert "mlp.w8a8-int8" in measured and not any(role.endswith("gguf-q8_0") for role in measured)
    before = plan_of(spec())
    moved = changed(before, plan_of(spec(throughput={"num_prompts": 8})))
    assert {label for name, label in moved if name == "gguf"} == {f"{m}.{s}" for m in MODELS
                                                                  for s in ("gguf-q8_0", "gguf-q4_k_m")}
    assert changed(before, plan_of(spec(data={"split": {"seed": 1}}))) & {("gguf", "teacher.gguf-q8_0")} == set()
    off = stage_config(VariantSpec(scheme="gguf-q8_0"), ThroughputSpec(enabled=False))
    assert off["throughput"] is None
    assert stage_key("gguf", "m.gguf-q8_0", off).digest != stage_key("gguf", "m.gguf-q8_0", {**off, "tool": "x"}).digest


# ----------------------------------------------------------------------------------------
# The dry run and llama.cpp's tools, through the CLI


def test_the_dry_run_lists_each_gguf_stage_with_its_size_and_the_fallbacks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(LLAMA_CPP_VARIABLE, str(fake_llama_cpp(tmp_path / "llama")))
    monkeypatch.setenv("MINIZOO_QUANTIZE_VENV", str(tmp_path / "none"))  # GGUF alone needs no llm-compressor
    code, out, err = dry_run(tmp_path, capsys, GGUF_SPEC)
    assert code == 0, err
    for model in MODELS:
        assert f"[todo]  gguf ({model}.gguf-q4_k_m)" in out
    # kept: the quantized file; peak: with the f16 GGUF it is made from
    disk = {line.split()[0]: line.split()[3:5] for line in out.splitlines() if line.startswith("  gguf-")}
    assert len(disk) == 6 and all(unit == "MB" for _, unit in disk.values())
    sizes = {label.split("-", 1)[1].rsplit("-", 1)[0]: float(size) for label, (size, unit) in disk.items()}
    assert sizes["teacher.gguf-q4_k_m"] < sizes["teacher.gguf-q8_0"] < 269  # bf16: 269 MB
    assert sizes["mlp.gguf-q8_0"] < sizes["teacher.gguf-q8_0"]
    assert "teacher.gguf-q4_k_m: hidden_size=576, num_attention_heads x head_dim=576 is no multiple of 256" in out
    assert "gguf-q8_0:" not in out  # Q8_0's 32-weight blocks divide every width


def test_gguf_variants_without_llama_cpp_are_a_spec_problem_naming_make_setup(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(LLAMA_CPP_VARIABLE, str(tmp_path / "missing"))
    monkeypatch.setenv("MINIZOO_QUANTIZE_VENV", str(fake_quantizer_venv(tmp_path / "venv")))
    code, out, err = dry_run(tmp_path, capsys, {**GGUF_SPEC, "variants": ["w8a8-int8", "gguf-q4_k_m"]})
    assert code == 2 and out == ""
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1
    assert problems[0].startswith("  - variants: gguf-q4_k_m: GGUF variants need llama.cpp's converter, llama-quantize "
                                  "and llama-server")
    assert f"{tmp_path / 'missing'}/build/bin/llama-server is missing" in problems[0]
    assert "run `make setup` (it builds llama.cpp's llama-quantize and llama-server into .llama.cpp)" in problems[0]
    # a family of compressed-tensors variants only needs no llama.cpp
    assert dry_run(tmp_path, capsys, {**GGUF_SPEC, "variants": ["w8a8-int8"]})[0] == 0


# ----------------------------------------------------------------------------------------
# Real files: llama.cpp's converter, llama-quantize and llama-server


@pytest.fixture(scope="module")
def llama_cpp():
    problem = llama_cpp_problem()
    if problem:  # the reason names llama.cpp: MINIZOO_REQUIRE_LLAMA_CPP=1 fails it (tests/conftest.py)
        pytest.skip(f"llama.cpp's tools are not built: {problem}")


@pytest.fixture(scope="module")
def smollm2_tokenizer(llama_cpp):
    """The embedded SmolLM2's tokenizer: the converter writes only tokenizers whose pre-tokenizer
    llama.cpp knows (a tiny trained one it refuses)."""
    import transformers

    from builder.embedded import package_dir
    from builder.models.teacher import EMBEDDED_TEACHER_FILES

    package, filename = EMBEDDED_TEACHER_FILES["smollm2-135m-instruct"]
    return transformers.AutoTokenizer.from_pretrained(package_dir(package), gguf_file=filename)


def seeded_llama(folder: Path, tokenizer, hidden: int, head_dim: int) -> Path:
    """A seeded 2-layer Llama, 4 heads and 2 kv heads of `head_dim`, MLP 512, its embedding scaled
    up (peaked next-token distributions), with `tokenizer`."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=head_dim, max_position_embeddings=512, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # tied: logits 30x larger, so each position has a clear likeliest token
        model.model.embed_tokens.weight.mul_(30)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Widths Q4_K's 256-weight super-blocks divide: 256 wide, 4 x 64 heads, 2 x 64 kv, MLP 512."""
    return seeded_llama(tmp_path_factory.mktemp("gguf-model"), smollm2_tokenizer, hidden=256, head_dim=64)


def run_stage(tmp_path: Path, source: Path, scheme: str, throughput: ThroughputSpec) -> dict:
    variant = VariantSpec(scheme=scheme)
    stage = Stage(stage_key("gguf", f"tiny.{scheme}", stage_config(variant, throughput)), {"model": "m"})
    inputs = {"model": Manifest("m", "", "", 0.0, summary={"model_dir": str(source)})}
    out_dir = tmp_path / scheme
    out_dir.mkdir()
    summary, tokens = gguf_stage(StageContext(stage, spec(), RunOptions(workdir=tmp_path), out_dir, inputs))
    assert tokens == 0
    return summary


@pytest.mark.slow
def test_the_stage_makes_a_q4_k_m_file_that_llama_server_serves_and_measures(tmp_path, gguf_model):
    import transformers

    from builder.models.arch import count_params

    workload = ThroughputSpec(input_len=16, output_len=8, num_prompts=3)
    summary = run_stage(tmp_path, gguf_model, "gguf-q4_k_m", workload)
    gguf_file = Path(summary["gguf_file"])
    assert gguf_file.name == "model-Q4_K_M.gguf" and gguf_file.stat().st_size == summary["bytes"]
    # the f16 file removed; a folder per measured file holds its server's log
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["Q4_K_M", "f16", "model-Q4_K_M.gguf"]
    # no fallback at these widths: Q4_K, Q6_K (attn_v, ffn_down, the tied embedding) and the f32 norms
    assert set(summary["tensor_types"]) == {"Q4_K", "Q6_K", "F32"} and summary["k_quant_fallbacks"] == {}
    assert summary["size_ratio"] < 0.45  # from the f16 GGUF
    config = transformers.AutoConfig.from_pretrained(gguf_model)
    estimated = gguf_bytes(VariantSpec(scheme="gguf-q4_k_m"), Shape.of(config), count_params(config))
    assert abs(estimated - summary["bytes"]) < 0.05 * summary["bytes"]  # the dry run's disk figure holds
    served = summary["llama_server"]
    assert (served["engine"], served["passes"], served["num_prompts"]) == ("llama-server", 3, 3)
    assert (served["input_tokens"], served["output_tokens"]) == (3 * 16, 3 * 8)
    assert served["output_tokens_per_s"] > 0 and served["output_tokens_per_s_std"] is not None
    assert len(served["per_pass"]) == 3 and served["server_build"]
    f16 = summary["llama_server_f16"]  # the file it was made from, the same workload in the same server
    assert (f16["input_tokens"], f16["output_tokens"]) == (3 * 16, 3 * 8)
    speedup = summary["speedup_vs_f16"]
    assert speedup["ratio"] == pytest.approx(served["output_tokens_per_s"] / f16["output_tokens_per_s"], rel=1e-3)
    assert speedup["std"] > 0
    assert sorted(p.name for p in (gguf_file.parent / "f16").iterdir()) == ["llama-server.log"]  # no pid file left


@pytest.fixture(scope="module")
def q8_0(tmp_path_factory, gguf_model) -> dict:
    """The gguf stage's summary of a Q8_0 file, made with throughput off (a short generation only)."""
    return run_stage(tmp_path_factory.mktemp("q8_0"), gguf_model, "gguf-q8_0", ThroughputSpec(enabled=False))


@pytest.mark.slow
def test_the_stage_makes_a_q8_0_file_that_generates_where_no_throughput_is_measured(q8_0):
    assert set(q8_0["tensor_types"]) == {"Q8_0", "F32"}
    assert q8_0["llama_server"]["generated_tokens"] == 8 and q8_0["quantization"] == "Q8_0"
    assert 0.5 < q8_0["size_ratio"] < 0.56  # 8.5 of 16 bits a weight


@pytest.mark.slow
def test_the_server_is_gone_when_its_measurement_ends_even_by_an_error(tmp_path, q8_0):
    gguf_file = Path(q8_0["gguf_file"])
    with pytest.raises(RuntimeError, match="inside"):
        with LlamaServer(gguf_file, threads=1, log_path=tmp_path / "server.log") as server:
            pid = server.proc.pid
            assert server.complete([1, 2, 3], 4)["tokens_predicted"] == 4
            raise RuntimeError("inside")
    assert group_members(pid) == [] and not Path(f"/proc/{pid}").exists()
    record = LlamaServerThroughput().run(ModelHandle(gguf_file), LlamaServerRun(
        LlamaServerWorkload(input_len=8, output_len=4, num_prompts=2, passes=2), tmp_path / "measure"), "cpu")
    assert record["output_tokens"] == 8 and len(record["per_pass"]) == 2
    assert not [line for line in os.popen("ps -eo args").read().splitlines()
                if line.startswith(str(gguf_file.parent)) or f"-m {gguf_file}" in line]


@pytest.mark.slow
def test_llama_servers_next_token_log_probs_agree_with_transformers(tmp_path, q8_0, gguf_model):
    """The Q8_0 file in llama-server against the float32 checkpoint in transformers, on the same
    token ids: the same likeliest next token at every position, its log-probability within 0.1."""
    import torch
    import transformers

    ids = transformers.AutoTokenizer.from_pretrained(gguf_model)("The quick brown fox jumps over the lazy dog. "
                                                                  "Hello, my name is")["input_ids"]
    with torch.no_grad():
        reference = torch.log_softmax(transformers.AutoModelForCausalLM.from_pretrained(gguf_model)(
            input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    with LlamaServer(Path(q8_0["gguf_file"]), threads=1, log_path=tmp_path / "server.log") as server:
        served = [server.next_token_logprobs(ids[:end]) for end in range(1, len(ids) + 1)]
    assert len(served) == len(ids) > 10
    for position, top in enumerate(served):
        likeliest = max(top, key=top.get)
        assert likeliest == int(reference[position].argmax()), position
        assert abs(top[likeliest] - float(reference[position, likeliest])) < 0.1, position
        assert top[likeliest] > -3  # peaked, so the agreement says something


@pytest.mark.slow
def test_q4_k_m_of_a_width_256_does_not_divide_is_made_with_llama_cpps_fallbacks(tmp_path, smollm2_tokenizer):
    """288 wide (4 x 72 heads): the tensors reading 288 inputs become Q5_0 (Q8_0 for attn_v and the
    tied embedding), those reading the MLP's 512 stay Q4_K/Q6_K; recorded, and the estimate holds."""
    import transformers

    from builder.models.arch import count_params

    source = seeded_llama(tmp_path / "odd", smollm2_tokenizer, hidden=288, head_dim=72)
    summary = run_stage(tmp_path, source, "gguf-q4_k_m", ThroughputSpec(enabled=False))
    assert summary["k_quant_fallbacks"] == {"hidden_size": 288, "num_attention_heads x head_dim": 288}
    # ffn_down reads 512: Q4_K in layer 0, Q6_K in layer 1 (llama.cpp's more-bits layer of 2)
    assert set(summary["tensor_types"]) == {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"}
    config = transformers.AutoConfig.from_pretrained(source)
    estimated = gguf_bytes(VariantSpec(scheme="gguf-q4_k_m"), Shape.of(config), count_params(config))
    assert abs(estimated - summary["bytes"]) < 0.05 * summary["bytes"]
    assert summary["llama_server"]["generated_tokens"] == 8
