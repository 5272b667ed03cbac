"""`build-family SPEC --rehearse` (builder.rehearse, builder.spec.rehearsal_scale): the scaling
arithmetic, the rehearsal spec of every committed family, and (slow) every family rehearsed
end to end offline on one shared local Ray instance."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from builder import family
from conftest import vllm_required
from test_search import check_search_build
from builder.spec import rehearsal_scale
from builder.models.teacher import config_from_json
from builder.options.run_options import RunOptions
from builder.rehearse import prepare, rehearse
from builder.spec.shape import Shape
from builder.spec.schema import TrainingSpec

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "configs"
FAMILIES = {  # every big spec in families/, with its committed teacher config
    "llama-3.1-8b-minitron.yaml": "Llama-3.1-8B.json",
    "mistral-nemo-12b-minitron.yaml": "Mistral-Nemo-Base-2407.json",
    "qwen3-family.yaml": "Qwen3-8B-Base.json",
}
LLAMA = Shape.of(config_from_json(CONFIGS / "Llama-3.1-8B.json"))


def test_the_rehearsal_teacher_keeps_the_attention_layout_and_shrinks_widths_and_depth():
    scale = rehearsal_scale.Scale.of(LLAMA)
    small = rehearsal_scale.rehearsal_shape(LLAMA, scale)
    assert (scale.width, scale.depth) == (16, 8)
    # 4 query heads per key/value head and head_dim 128 as in Llama-3.1-8B, 2 groups instead of 8.
    assert small == Shape(hidden_size=256, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2,
                          num_hidden_layers=4, head_dim=128)


def test_students_keep_their_ratio_to_the_teacher_on_every_axis():
    small = rehearsal_scale.rehearsal_shape(LLAMA, rehearsal_scale.Scale.of(LLAMA))
    width = rehearsal_scale.student_changes({"hidden_size": 3072, "intermediate_size": 9216}, LLAMA, small)
    assert width == {"hidden_size": 192, "intermediate_size": 576}  # 3/4 and 9/14 of 256 and 896
    assert rehearsal_scale.student_changes({"num_hidden_layers": 16}, LLAMA, small) == {"num_hidden_layers": 2}
    # A cut axis stays cut even when the ratio would round back to the teacher's size.
    assert rehearsal_scale.student_changes({"hidden_size": 4064}, LLAMA, small) == {"hidden_size": 248}
    assert rehearsal_scale.budget(4_000_000_000, 8_000_000_000, 10_000_000) == 5_000_000
    # Heads: whole groups by their ratio (4 of 8 -> 1 of 2), query heads per group as the student has them.
    assert rehearsal_scale.student_changes({"num_attention_heads": 16, "num_key_value_heads": 4}, LLAMA, small) == \
        {"num_attention_heads": 4, "num_key_value_heads": 1}
    assert rehearsal_scale.student_changes({"num_attention_heads": 24}, LLAMA, small) == \
        {"num_attention_heads": 6, "num_key_value_heads": 2}


def test_budgets_shrink_to_two_steps_of_the_global_batch():
    section = TrainingSpec(tokens="94B", global_batch_size=1152, micro_batch_size=4, warmup_steps=40,
                           checkpoint_every=500)
    scaled = rehearsal_scale.training(section, workers=2)
    # 2 steps x (micro-batch 2 x 2 accumulated x 2 workers) x 64 tokens
    assert scaled == {"tokens": 2 * 2 * 2 * 2 * 64, "global_batch_size": 8, "micro_batch_size": 2,
                      "warmup_steps": 1, "checkpoint_every": 1}
    assert rehearsal_scale.training(TrainingSpec(tokens=0), workers=2)["tokens"] == 0


@pytest.fixture(scope="module")
def rehearsal_specs(tmp_path_factory):
    """Each family's rehearsal spec, prepared (teacher, data, spec) but not built."""
    prepared = {}
    for spec_name, config in FAMILIES.items():
        options = RunOptions(workdir=tmp_path_factory.mktemp(spec_name), teacher_config=CONFIGS / config)
        plan = family.load_and_plan(ROOT / "families" / spec_name, options)
        teacher_config = config_from_json(CONFIGS / config)
        folder = Path(options.workdir) / "rehearsal"
        prepared[spec_name] = (plan, teacher_config, prepare(plan.spec, teacher_config, folder, options, False))
    return prepared


@pytest.mark.parametrize("spec_name", sorted(FAMILIES))
def test_every_family_has_a_valid_rehearsal_of_the_same_architecture(rehearsal_specs, spec_name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_plan, real_config, spec_file = rehearsal_specs[spec_name]
    plan = family.load_and_plan(spec_file, RunOptions(workdir=spec_file.parent))  # validates against its teacher
    small = config_from_json(spec_file.parent / "teacher" / "config.json")
    assert small.model_type == real_config.model_type
    assert small.tie_word_embeddings == real_config.tie_word_embeddings
    assert plan.teacher_shape.head_dim == real_plan.teacher_shape.head_dim
    ratio = plan.teacher_shape.num_attention_heads / plan.teacher_shape.num_key_value_heads
    assert ratio == real_plan.teacher_shape.num_attention_heads / real_plan.teacher_shape.num_key_value_heads
    assert plan.teacher_params < 50_000_000
    assert plan.spec.family.endswith("-rehearsal") and plan.spec.description.startswith("REHEARSAL")
    assert [s.spec.name for s in plan.students] == [s.spec.name for s in real_plan.students]
    for real, rehearsed in zip(real_plan.students, plan.students):
        assert rehearsed.searched == real.searched
        if real.searched:  # a budget keeps its share of the teacher, up to rounding to whole parameters
            share, real_share = rehearsed.params / plan.teacher_params, real.params / real_plan.teacher_params
            assert share == pytest.approx(real_share, rel=1e-6)
            continue
        for field in real.spec.shape.changes():  # a shape keeps its ratio to the teacher per axis,
            # up to rounding to a multiple of the head count or of 8 (8 of 256: 1/32), and to whole layers
            ratio = getattr(rehearsed.shape, field) / getattr(plan.teacher_shape, field)
            real_ratio = getattr(real.shape, field) / getattr(real_plan.teacher_shape, field)
            assert ratio == pytest.approx(real_ratio, abs=1 / 16 if field != "num_hidden_layers" else 1 / 8)
    real_keys = {stage.key.digest for stage in real_plan.stages.values()}
    assert not real_keys & {stage.key.digest for stage in plan.stages.values()}
    notes = json.loads((spec_file.parent / "REHEARSAL.json").read_text())
    assert notes["rehearsal"] and notes["tasks_left_out"] == ["truthfulqa_mc2", "gsm8k"]


@pytest.fixture(scope="module")
def rehearsal_ray():
    """One local Ray instance for the rehearsals that run in this process (under xdist each
    family may run in another worker, which starts its own), started as builds start theirs:
    with one training worker, so without a dashboard (no Ray Train group asks its state API:
    tests/test_ray_train.py)."""
    from ray_instance import local_ray

    with local_ray(RunOptions(local_cpus=2)):
        yield


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a rehearsal with vLLM shares two cores with the rest of the suite
class _Rehearsal:
    """Every stage of one family for real (pruning, Ray Train distillation, lm-eval on the
    spec's tasks, vLLM throughput of the teacher and every student, cards, publish dry run);
    a rehearsal reuses its stage processes. One class per family, so that pytest-xdist runs
    the families side by side (a class is a scope of its own)."""

    spec_name: str

    def test_rehearses_end_to_end_offline(self, rehearsal_ray, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        throughput = importlib.util.find_spec("vllm") is not None
        if not throughput and vllm_required():
            pytest.fail("MINIZOO_REQUIRE_VLLM=1 but vLLM is not installed: no rehearsal can measure throughput")
        spec = ROOT / "families" / self.spec_name
        options = RunOptions(workdir=tmp_path, teacher_config=CONFIGS / FAMILIES[self.spec_name], cpus_per_stage=1)
        assert rehearse(spec, options, with_throughput=throughput) == 0, self.spec_name
        _check_rehearsal(tmp_path / "rehearsal", spec, throughput)
        _check_every_search(tmp_path / "rehearsal", spec)


class TestLlamaRehearsal(_Rehearsal):
    spec_name = "llama-3.1-8b-minitron.yaml"


class TestMistralNemoRehearsal(_Rehearsal):
    spec_name = "mistral-nemo-12b-minitron.yaml"


class TestQwen3Rehearsal(_Rehearsal):
    spec_name = "qwen3-family.yaml"


def test_every_family_has_a_rehearsal_test():
    assert {cls.spec_name for cls in _Rehearsal.__subclasses__()} == set(FAMILIES)


def _check_every_search(folder: Path, spec_path: Path) -> None:
    """Each student given by a budget (`params:`) went through the whole search
    (tests/test_search.py's checks, which need a real build: this one)."""
    real = yaml.safe_load(spec_path.read_text())
    for student in real["students"]:
        if "params" in student:
            check_search_build(folder / "spec.yaml", folder, real["family"] + "-rehearsal", student["name"])


def test_a_rehearsal_runs_a_search():
    """tests/test_search.py's whole-search checks run on a rehearsal: one family must have one."""
    specs = [yaml.safe_load((ROOT / "families" / name).read_text()) for name in FAMILIES]
    assert any("params" in student for spec in specs for student in spec["students"])


def _check_rehearsal(folder: Path, spec_path: Path, throughput: bool) -> None:
    (report_file,) = folder.glob("*-rehearsal/report.json")
    report = json.loads(report_file.read_text())
    assert report["complete"] and not report["failures"]
    assert report["description"].startswith("REHEARSAL")
    # lm-eval scored every model on the spec's tasks, but those with no offline data
    left_out = json.loads((folder / "REHEARSAL.json").read_text())["tasks_left_out"]
    tasks = {task["name"] for task in yaml.safe_load(spec_path.read_text())["evaluation"]["tasks"]} - set(left_out)
    for model in [report["teacher"], *report["students"]]:
        assert set(model["tasks"]) == tasks and all(task["samples"] >= 1 for task in model["tasks"].values())
    for student in report["students"]:
        assert student["perplexity"]["perplexity"] > 1.0
        assert "REHEARSAL" in Path(student["card"]).read_text() or "rehearsal" in Path(student["card"]).read_text()
    manifests = [json.loads(f.read_text()) for f in folder.glob("stages/*/manifest.json")]
    assert manifests and all(m["summary"].get("rehearsal") for m in manifests)
    measured = [m["summary"]["results"] for m in manifests if m["stage"] == "throughput"]
    if throughput:  # the teacher and every student generated in vLLM
        assert len(measured) == 1 and len(measured[0]) == 1 + len(report["students"])
        assert all(result["output_tokens_per_s"] > 0 for result in measured[0].values()), measured
    else:
        assert not measured
