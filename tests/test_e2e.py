"""The whole pipeline through the CLI with every real component: a local Ray instance on
127.0.0.1, real pruning and distillation (one student with the online teacher, one from its
stored top-k signal, one chained member pruned from and taught by the first), real lm-eval on a bundled offline task, real vLLM
throughput (always on: without vLLM its test skips, and fails under MINIZOO_REQUIRE_VLLM=1),
cards and the family report; then a second run that reuses everything.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from builder.cli import main
from tests.tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.e2e

SPEC = """
family: tiny-e2e
teacher: {{source: {teacher}, repo_id: minizoo-tests/tiny-teacher, license: mit}}
data:
  source: embedded:sotu
  seq_len: 64
  max_tokens: 60K
  split: {{calibration: 0.2, heldout: 0.2, seed: 1}}
correction: {{tokens: 1K, global_batch_size: 4, checkpoint_every: 2}}
scoring: {{samples: 16, batch_size: 8}}
distill: {{tokens: 2K, global_batch_size: 4, learning_rate: 1.0e-3, warmup_steps: 1, checkpoint_every: 3,
          teacher_signal: online}}
students:
  - name: tiny-width
    shape: {{hidden_size: 48, intermediate_size: 96}}
  - name: tiny-depth
    shape: {{num_hidden_layers: 2}}
    depth_method: contiguous
    # from the teacher's stored top-k signal (a teach stage), where tiny-width runs it online
    distill: {{tokens: 2K, global_batch_size: 4, learning_rate: 1.0e-3, warmup_steps: 1, checkpoint_every: 3,
              teacher_signal: topk, top_k: 32, tail_samples: 8}}
  - name: tiny-chain  # a chained member: pruned from tiny-width's distilled model, taught by it online
    from: tiny-width
    shape: {{hidden_size: 32, intermediate_size: 64}}
evaluation:
  tasks: [{{name: arc_easy, limit: 8}}]
  batch_size: 8
  perplexity_tokens: 1K
throughput:
  enabled: true
  input_len: 16
  output_len: 16
  num_prompts: 4
  dtype: float32
  engine_args: {{enforce_eager: true, max_model_len: 128}}
publish: {{org: minizoo-tests}}
"""


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def built_family(tmp_path_factory, shared_ray):
    root = tmp_path_factory.mktemp("e2e")
    # head_dim 32: vLLM's CPU attention kernels have no head_dim 16 (the tiny default).
    teacher = save_tiny_checkpoint(root / "teacher", seed=3, head_dim=32)
    spec = root / "tiny.yaml"
    spec.write_text(SPEC.format(teacher=teacher))
    workdir = root / "runs"
    started = time.perf_counter()
    code = main([str(spec), "--workdir", str(workdir)])
    return spec, workdir, code, time.perf_counter() - started


def test_build_succeeds_and_writes_the_report(built_family):
    spec, workdir, code, _ = built_family
    assert code == 0
    report = json.loads((workdir / "tiny-e2e" / "report.json").read_text())
    assert report["family"] == "tiny-e2e"
    assert [s["name"] for s in report["students"]] == ["tiny-width", "tiny-depth", "tiny-chain"]
    for student in report["students"]:
        assert student["params"] < report["teacher"]["params"]
        assert 0.0 <= student["tasks"]["arc_easy"]["scores"]["acc"] <= 1.0
        assert student["perplexity"]["perplexity"] > 1.0
        assert student["stages"]["distill"]["tokens"] >= 2000
        assert Path(student["card"]).read_text().startswith("---")
    assert (workdir / "tiny-e2e" / "report.md").exists()


def test_the_teacher_teaches_once_and_the_topk_student_reads_its_signal(built_family):
    _, workdir, _, _ = built_family
    (teach,) = workdir.glob("stages/teach-k32+8-*")
    manifest = json.loads((teach / "manifest.json").read_text())
    assert manifest["summary"]["top_k"] == 32 and manifest["summary"]["bytes_per_token"] == 32 * 4 + 2 + 8 * 2
    assert manifest["summary"]["workers"] >= 1 and manifest["tokens"] > 0
    summary = lambda name: json.loads(next(workdir.glob(f"stages/distill-{name}-*/manifest.json")).read_text())[  # noqa: E731
        "summary"]
    assert summary("tiny-depth")["teacher_signal"] == str(teach) and summary("tiny-width")["teacher_signal"] == "online"
    report = json.loads((workdir / "tiny-e2e" / "report.json").read_text())
    assert report["teacher"]["stages"]["teach (top-32, 8 draws)"]["tokens"] == manifest["tokens"]
    by_name = {s["name"]: s for s in report["students"]}
    assert by_name["tiny-depth"]["lineage"]["distillation"]["teacher_signal"] == "topk"
    assert by_name["tiny-width"]["lineage"]["distillation"]["teacher_signal"] == "online"
    card = Path(by_name["tiny-depth"]["card"]).read_text()
    assert "stored top-32 log-probabilities and 8 draws from the rest" in card
    assert "| teach (top-32, 8 draws) (shared) |" in card


def test_students_load_with_plain_from_pretrained(built_family):
    _, workdir, _, _ = built_family
    report = json.loads((workdir / "tiny-e2e" / "report.json").read_text())
    width, depth, chained = report["students"]
    model = AutoModelForCausalLM.from_pretrained(width["path"])
    assert model.config.hidden_size == 48 and model.config.head_dim == 32
    assert AutoModelForCausalLM.from_pretrained(depth["path"]).config.num_hidden_layers == 2
    small = AutoModelForCausalLM.from_pretrained(chained["path"])
    assert (small.config.hidden_size, small.config.intermediate_size, small.config.head_dim) == (32, 64, 32)
    assert torch.isfinite(small(torch.tensor([[1, 5, 9, 12]])).logits).all()
    logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()


def test_the_chained_member_is_pruned_from_and_taught_by_its_parents_distilled_model(built_family):
    _, workdir, _, _ = built_family
    stage = lambda glob: next(workdir.glob(f"stages/{glob}"))  # noqa: E731
    read = lambda glob: set(json.loads((stage(glob) / "manifest.json").read_text())["inputs"])  # noqa: E731
    parent, parent_scores = stage("distill-tiny-width-*").name, stage("score-tiny-width-*").name
    # importance scored again on the parent's distilled weights, which the chained member is cut from
    assert parent in read("score-tiny-width-*") and {parent, parent_scores} <= read("prune-tiny-chain-*")
    assert parent in read("distill-tiny-chain-*")  # its teacher
    assert not any(name.startswith("acquire-teacher") for name in read("distill-tiny-chain-*"))
    report = json.loads((workdir / "tiny-e2e" / "report.json").read_text())
    chained = {s["name"]: s for s in report["students"]}["tiny-chain"]
    assert chained["lineage"]["parent"] == "tiny-width" and chained["lineage"]["chain"] == ["tiny-width"]
    assert chained["lineage"]["pruning"]["axes"] == {"hidden_size": [48, 32], "intermediate_size": [96, 64]}
    card = Path(chained["card"]).read_text()
    assert "base_model: minizoo-tests/tiny-width" in card and "teacher -> tiny-width -> tiny-chain" in card
    assert "its parent `tiny-width`'s logits" in card
    assert "`tiny-chain` is a chained member" in (workdir / "tiny-e2e" / "report.md").read_text()


@pytest.mark.skipif(not _vllm_installed(), reason="vLLM is not installed")
def test_throughput_measured_with_vllm(built_family):
    """The one stage allowed to fail without failing the build: its numbers must be there."""
    _, workdir, _, _ = built_family
    report = json.loads((workdir / "tiny-e2e" / "report.json").read_text())
    assert report["complete"]
    assert report["teacher"]["throughput"]["ratio_to_teacher"] == pytest.approx(1.0)
    for model in [report["teacher"], *report["students"]]:
        numbers = model["throughput"] or {"error": f"no throughput recorded for {model['name']}"}
        assert numbers["error"] is None, numbers["error"]
        # ignore_eos: every prompt generates exactly output_len tokens.
        assert numbers["output_tokens"] == 4 * 16 and numbers["num_prompts"] == 4
        # several timed passes, so the rate has a spread and the machine's load is judged
        assert numbers["output_tokens_per_s"] > 0 and numbers["passes"] > 1
        assert numbers["output_tokens_per_s_std"] is not None and numbers["contended"] in (True, False)


def test_second_run_reuses_every_stage(built_family):
    spec, workdir, _, first_wall = built_family
    manifests = sorted(workdir.glob("stages/*/manifest.json"))
    stamps = [m.stat().st_mtime_ns for m in manifests]
    started = time.perf_counter()
    assert main([str(spec), "--workdir", str(workdir)]) == 0
    assert time.perf_counter() - started < min(30.0, first_wall / 2)
    assert [m.stat().st_mtime_ns for m in sorted(workdir.glob("stages/*/manifest.json"))] == stamps


def test_a_lost_stage_is_rebuilt_alone(built_family, shared_ray):  # on the first build's Ray instance
    spec, workdir, _, _ = built_family
    (evaluate_depth,) = workdir.glob("stages/evaluate-tiny-depth-*")
    (evaluate_depth / "manifest.json").unlink()
    others = {m: m.stat().st_mtime_ns for m in workdir.glob("stages/*/manifest.json")}
    assert main([str(spec), "--workdir", str(workdir)]) == 0
    assert (evaluate_depth / "manifest.json").exists()
    assert {m: m.stat().st_mtime_ns for m in others} == others


def test_a_gate_the_students_miss_fails_the_build_and_their_publishing_without_recomputing(built_family, capsys):
    """Last: it rewrites the family's report from a copy of the spec with a gate added."""
    spec, workdir, _, _ = built_family
    gated = spec.with_name("gated.yaml")
    publish = "publish: {org: minizoo-tests}"
    gated.write_text(spec.read_text().replace(publish, "gates: {max_perplexity_ratio: 0.01}\n" + publish))
    stamps = {m: m.stat().st_mtime_ns for m in workdir.glob("stages/*/manifest.json")}

    assert main([str(gated), "--workdir", str(workdir)]) == 3

    assert {m: m.stat().st_mtime_ns for m in workdir.glob("stages/*/manifest.json")} == stamps  # all reused
    report = json.loads((workdir / "tiny-e2e" / "report.json").read_text())
    for student in report["students"]:
        [check] = student["gates"]
        assert (check["passed"], check["limit"]) == (False, 0.01)
        assert check["student"] == student["perplexity"]["perplexity"] > 0.01 * check["teacher"]
        assert check["teacher"] == report["teacher"]["perplexity"]["perplexity"]
    students = len(report["students"])  # every one of them, the chained member too
    assert (workdir / "tiny-e2e" / "report.md").read_text().count("**FAILED**: held-out perplexity") == students
    capsys.readouterr()
    assert main(["publish", str(gated), "--workdir", str(workdir), "--dry-run"]) == 1
    assert capsys.readouterr().out.count("REFUSED: it failed its quality gate") == students

    gated.write_text(spec.read_text().replace(publish, "gates: {max_perplexity_ratio: 1000}\n" + publish))
    assert main([str(gated), "--workdir", str(workdir)]) == 0
    report = json.loads((workdir / "tiny-e2e" / "report.json").read_text())
    assert [[check["passed"] for check in student["gates"]] for student in report["students"]] == [[True]] * students
