"""Spec validation: every family file loads; every kind of mistake gets one clear problem
naming the field, the value and the fix; several mistakes are all reported at once.

Phase 1 (the schema) needs nothing; phase 2 checks against a teacher's config: the tiny
test model's, or the real SmolLM2-135M-Instruct config committed in tests/data/configs.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from builder.models.teacher import config_from_json
from builder.errors import Problem, SpecError
from builder.spec.schema import FamilySpec, Reference
from builder.planning.validate import check_against_teacher, load_spec
from tests.tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = sorted((ROOT / "families").glob("*.yaml"))
CONFIGS = ROOT / "tests" / "data" / "configs"


# --- helpers ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _lm_eval_names_from_files() -> tuple[str, ...]:
    """lm-eval's built-in task and group names, read from its task YAMLs with a regex.

    lm-eval's TaskManager parses all ~14,000 of those files (30+ s on two cores); the
    names are all these tests need. Tasks defined only in Python are missing here, so
    tests use common names that live in YAML (hellaswag, mmlu, gsm8k, ...).
    """
    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    pattern = re.compile(r"^(?:task|group):\s*['\"]?([\w.-]+)", re.MULTILINE)
    names = set()
    for file in root.rglob("*.yaml"):
        names.update(pattern.findall(file.read_text(errors="ignore")))
    return tuple(sorted(names))


@pytest.fixture
def fast_lm_eval_index(monkeypatch):
    """Answer built-in task-name lookups from the task files (see above), in seconds."""
    from evaluators import lm_eval_runner

    monkeypatch.setattr(lm_eval_runner, "_builtin_task_names", _lm_eval_names_from_files)


def minimal_spec() -> dict:
    """A valid spec: tests change one thing and expect exactly one problem."""
    return {
        "family": "tiny",
        "teacher": {"source": "embedded:smollm2-135m-instruct"},
        "distill": {"tokens": "48K"},
        "students": [{"name": "tiny-width", "shape": {"hidden_size": 48}}],
        "evaluation": {"tasks": [{"name": "hellaswag", "limit": 10}]},
    }


def write(tmp_path: Path, spec: dict | str) -> Path:
    path = tmp_path / "family.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def problems(tmp_path: Path, spec: dict | str) -> list[Problem]:
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, spec))
    return error.value.problems


def only_problem(tmp_path: Path, spec: dict | str) -> Problem:
    found = problems(tmp_path, spec)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def changed(**sections) -> dict:
    """minimal_spec() with top-level sections replaced (None removes one)."""
    spec = copy.deepcopy(minimal_spec())
    for name, value in sections.items():
        if value is None:
            spec.pop(name)
        else:
            spec[name] = value
    return spec


def with_student(**fields) -> dict:
    return changed(students=[{"name": "tiny-width", **fields}])


# --- good specs ------------------------------------------------------------------------


@pytest.mark.parametrize("path", FAMILIES, ids=lambda p: p.name)
def test_every_family_file_loads(path):
    spec = load_spec(path)
    assert spec.students and spec.family


def test_the_minimal_spec_loads_with_units_parsed_and_defaults_filled(tmp_path):
    spec = load_spec(write(tmp_path, minimal_spec()))
    assert spec.distill.tokens == 48_000
    assert spec.data.source == "embedded:sotu" and spec.scoring.samples == 1024
    assert spec.students[0].shape.changes() == {"hidden_size": 48}


def test_the_spec_is_frozen(tmp_path):
    spec = load_spec(write(tmp_path, minimal_spec()))
    with pytest.raises(Exception):
        spec.family = "other"


# --- phase 1: one test per message -----------------------------------------------------


def test_unknown_top_level_field_suggests_the_right_one_and_lists_the_allowed(tmp_path):
    spec = changed()
    spec["studnets"] = spec["students"]
    problem = only_problem(tmp_path, spec)
    assert problem.field == "studnets"
    assert "did you mean 'students'?" in problem.message
    for field in FamilySpec.model_fields:
        assert field in problem.message


def test_unknown_shape_field_is_located_and_suggested(tmp_path):
    problem = only_problem(tmp_path, with_student(shape={"hidden_size": 48, "hiden_size": 40}))
    assert problem.field == "students[0].shape.hiden_size"
    assert "did you mean 'hidden_size'?" in problem.message
    assert "num_key_value_heads" in problem.message  # the allowed fields are listed


def test_a_field_at_the_wrong_level_says_where_it_belongs(tmp_path):
    problem = only_problem(tmp_path, with_student(shape={"hidden_size": 48}, num_hidden_layers=2))
    assert problem.field == "students[0].num_hidden_layers"
    assert "belongs under students[].shape" in problem.message


def test_names_from_other_tools_map_to_the_spec_names(tmp_path):
    problem = only_problem(tmp_path, changed(distill={"tokens": "48K", "lr": 1e-4}))
    assert problem.field == "distill.lr" and "did you mean 'learning_rate'?" in problem.message


@pytest.mark.parametrize("section, field", [("distill", "distill"), ("teacher", "teacher.source")])
def test_missing_required_field(tmp_path, section, field):
    spec = changed()
    if section == "teacher":
        spec["teacher"] = {"license": "mit"}
    else:
        spec.pop(section)
    problem = only_problem(tmp_path, spec)
    assert problem.field == field and problem.message.startswith("is required")
    assert "add it" in problem.message


def test_bad_unit_names_the_value_and_the_accepted_forms(tmp_path):
    problem = only_problem(tmp_path, changed(distill={"tokens": "90 megas"}))
    assert problem.field == "distill.tokens"
    assert "'90 megas' is not a count" in problem.message and "90M, 2.5B" in problem.message


def test_shapes_take_exact_integers_not_units(tmp_path):
    problem = only_problem(tmp_path, with_student(shape={"hidden_size": "3K"}))
    assert problem.field == "students[0].shape.hidden_size"
    assert "'3K' is not a whole number" in problem.message and "no K or M units" in problem.message


@pytest.mark.parametrize("where, value", [("family", "Bad Name"), ("student", "My_Student")])
def test_bad_slug_name(tmp_path, where, value):
    spec = changed(family=value) if where == "family" else with_student(name=value, shape={"hidden_size": 48})
    problem = only_problem(tmp_path, spec)
    assert problem.field == ("family" if where == "family" else "students[0].name")
    assert repr(value) in problem.message and "lowercase letters, digits" in problem.message


def test_duplicate_student_names(tmp_path):
    student = {"name": "twin", "shape": {"hidden_size": 48}}
    problem = only_problem(tmp_path, changed(students=[student, student]))
    assert problem.field == "students" and "'twin'" in problem.message and "unique" in problem.message


def test_duplicate_student_names_are_reported_beside_other_student_mistakes(tmp_path):
    # pydantic skips the family-level uniqueness check when a student is invalid.
    twins = [{"name": "twin", "shape": {"hidden_size": 48}}, {"name": "twin", "shape": {"hidden_size": -1}}]
    found = problems(tmp_path, changed(students=twins))
    assert [p.field for p in found] == ["students[1].shape.hidden_size", "students"]
    assert "-1 is too small; use a number > 0" in found[0].message


def test_shape_and_params_both(tmp_path):
    problem = only_problem(tmp_path, with_student(shape={"hidden_size": 48}, params="90M"))
    assert problem.field == "students[0]"
    assert "both `shape` and `params`" in problem.message and "keep one" in problem.message


def test_shape_and_params_neither(tmp_path):
    problem = only_problem(tmp_path, with_student())
    assert problem.field == "students[0]" and "neither `shape` nor `params`" in problem.message


def test_empty_shape(tmp_path):
    problem = only_problem(tmp_path, with_student(shape={}))
    assert problem.field == "students[0].shape"
    assert "empty" in problem.message and "hidden_size" in problem.message


def test_no_students(tmp_path):
    problem = only_problem(tmp_path, changed(students=[]))
    assert problem.field == "students" and "at least 1" in problem.message


def test_split_fractions_that_leave_no_training_data(tmp_path):
    problem = only_problem(tmp_path, changed(data={"split": {"calibration": 0.5, "heldout": 0.45}}))
    assert problem.field == "data.split"
    assert "0.5" in problem.message and "0.45" in problem.message and "less than 0.9" in problem.message


def test_a_fraction_out_of_range(tmp_path):
    problem = only_problem(tmp_path, changed(data={"split": {"calibration": 1.5}}))
    assert problem.field == "data.split.calibration" and "1.5 is too large; use a number < 1" in problem.message


@pytest.mark.parametrize("source, expected", [
    ("embedded:unknown", "available: embedded:smollm2-135m-instruct"),
    ("embedded:smollm2-135m", "did you mean 'embedded:smollm2-135m-instruct'?"),
    ("hf:not a repo", "is not a Hub repo id; write hf:ORG/NAME@REVISION"),
    ("hf:meta-llama/Llama-3.1-8B@", "is not a revision"),
    ("llama", "is not a reference; write embedded:NAME"),
])
def test_bad_references(tmp_path, source, expected):
    problem = only_problem(tmp_path, changed(teacher={"source": source}))
    assert problem.field == "teacher.source" and expected in problem.message


@pytest.mark.parametrize("text, kind, name, revision", [
    ("hf:HuggingFaceFW/fineweb-edu@main", "hf", "HuggingFaceFW/fineweb-edu", "main"),
    ("hf:meta-llama/Llama-3.1-8B", "hf", "meta-llama/Llama-3.1-8B", None),
    ("./corpus", "path", "./corpus", None),
    ("embedded:sotu", "embedded", "sotu", None),
])
def test_good_references_parse(text, kind, name, revision):
    reference = Reference.parse(text, ("sotu",))
    assert (reference.kind, reference.name, reference.revision) == (kind, name, revision)
    assert str(reference) == text


def test_bad_hub_ids_for_publishing(tmp_path):
    spec = with_student(shape={"hidden_size": 48}, repo_id="no-slash")
    spec["publish"] = {"org": "an/org"}
    found = problems(tmp_path, spec)
    assert [p.field for p in found] == ["students[0].repo_id", "publish.org"]
    assert "write ORG/NAME" in found[0].message and "no '/'" in found[1].message


def test_allowed_values_are_listed_with_a_suggestion(tmp_path):
    problem = only_problem(tmp_path, with_student(shape={"num_hidden_layers": 2}, depth_method="blockimportance"))
    assert problem.field == "students[0].depth_method"
    assert "did you mean 'block_importance'?" in problem.message
    assert "block_importance, lm_loss, contiguous, last" in problem.message


def test_a_section_written_as_a_value_shows_the_mapping_to_write(tmp_path):
    problem = only_problem(tmp_path, changed(distill="94B"))
    assert problem.field == "distill" and "such as {tokens: 94B}" in problem.message


def test_a_bare_task_name_shows_the_mapping_to_write(tmp_path):
    problem = only_problem(tmp_path, changed(evaluation={"tasks": ["hellaswag"]}))
    assert problem.field == "evaluation.tasks[0]" and "{name: hellaswag}" in problem.message


def test_a_non_boolean(tmp_path):
    problem = only_problem(tmp_path, changed(throughput={"enabled": "maybe"}))
    assert problem.field == "throughput.enabled" and "'maybe' is not true or false" in problem.message


def test_throughput_prompts_longer_than_max_model_len(tmp_path):
    throughput = {"input_len": 512, "output_len": 128, "engine_args": {"max_model_len": 512}}
    problem = only_problem(tmp_path, changed(throughput=throughput))
    assert problem.field == "throughput" and "exceeds engine_args.max_model_len 512" in problem.message


def test_engine_args_may_not_set_what_the_throughput_worker_sets():
    from pydantic import ValidationError

    from builder.spec.schema import ThroughputSpec
    from evaluators.throughput import _RESERVED_ENGINE_ARGS

    # the worker's own list: a key it adds later must be refused here too, or a spec setting it
    # would load and then fail in the dry run's estimate (which builds ThroughputSettings)
    for key in _RESERVED_ENGINE_ARGS:
        with pytest.raises(ValidationError, match=f"engine_args sets '{key}' .*which minizoo sets itself"):
            ThroughputSpec(engine_args={key: 1, "enforce_eager": True})
    assert ThroughputSpec(engine_args={"enforce_eager": True}).engine_args == {"enforce_eager": True}


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    problem = only_problem(tmp_path, "family: tiny\nstudents:\n  - name: a\n   shape: {hidden_size: 48}\n")
    assert problem.field == "line 4, column 4" and "is not valid YAML" in problem.message


def test_a_repeated_yaml_key_is_a_problem_not_a_silent_override(tmp_path):
    problem = only_problem(tmp_path, "family: tiny\nfamily: other\n")
    assert problem.field == "line 2, column 1" and "'family' appears a second time" in problem.message


@pytest.mark.parametrize("text, expected", [
    ("- family: tiny\n", "holds a list, not a mapping"),
    ("just words\n", "holds a str, not a mapping"),
    ("", "the file is empty"),
])
def test_a_spec_that_is_not_a_mapping(tmp_path, text, expected):
    problem = only_problem(tmp_path, text)
    assert problem.field == "(spec)" and expected in problem.message


def test_a_missing_file(tmp_path):
    with pytest.raises(SpecError) as error:
        load_spec(tmp_path / "nope.yaml")
    assert "does not exist" in str(error.value)


def test_several_mistakes_are_all_listed(tmp_path):
    spec = {
        "family": "Bad Name",                                    # 1 slug
        "teacher": {"source": "hf:not a repo"},                  # 2 reference
        "data": {"seq_len": "90 megas"},                         # 3 unit
        "distill": {"tokens": "1B", "loss": "kl"},               # 4 literal
        "studnets": [],                                          # 5 unknown field
        "students": [
            {"name": "a", "shape": {"hiden_size": 10}},          # 6 unknown shape field
            {"name": "b", "shape": {"hidden_size": 10}, "params": "90M"},  # 7 both
            {"name": "a", "shape": {}},                          # 8 empty shape; 9 repeated name
        ],
        "throughput": {"dtype": "fp8"},                          # 10 literal
    }
    found = problems(tmp_path, spec)
    assert sorted(p.field for p in found) == sorted([
        "family", "teacher.source", "data.seq_len", "distill.loss", "studnets",
        "students[0].shape.hiden_size", "students[1]", "students[2].shape", "students", "throughput.dtype",
    ])
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, spec))
    assert str(error.value).splitlines()[0].endswith("10 problems; nothing was run:")


# --- phase 2: against the teacher's config ---------------------------------------------


def spec_for(*students: dict, **sections) -> FamilySpec:
    data = changed(students=list(students), **sections)
    return FamilySpec.model_validate(data)


def smollm2_config():
    return config_from_json(CONFIGS / "SmolLM2-135M-Instruct.json")


def test_a_valid_spec_has_no_phase_2_problems():
    spec = spec_for({"name": "w", "shape": {"hidden_size": 48, "intermediate_size": 96}},
                    {"name": "d", "shape": {"num_hidden_layers": 2}})
    assert check_against_teacher(spec, tiny_config()) == []


def test_a_shape_larger_than_the_teacher():
    [problem] = check_against_teacher(spec_for({"name": "big", "shape": {"hidden_size": 128}}), tiny_config())
    assert problem.field == "students[0].shape.hidden_size"
    assert "larger than the teacher's 64" in problem.message and "hidden_size <= 64" in problem.message


def test_hidden_not_divisible_by_heads_suggests_valid_values():
    # SmolLM2-135M: 576 channels, 9 heads of 64. 448 = 576 * 7/9 is not a multiple of 9.
    spec = spec_for({"name": "w", "shape": {"hidden_size": 448}})
    [problem] = check_against_teacher(spec, smollm2_config())
    assert problem.field == "students[0].shape.hidden_size"
    assert "hidden_size=448 is not a multiple of num_attention_heads=9" in problem.message
    assert "hidden_size in [441, 450, 459]" in problem.message


def test_heads_not_reachable_from_the_gqa_groups():
    # The tiny teacher has 2 groups of 2 query heads; 1 group of 4 would need heads it lacks.
    [problem] = check_against_teacher(spec_for({"name": "g", "shape": {"num_key_value_heads": 1}}), tiny_config())
    assert problem.field == "students[0].shape"
    assert "needs 4 query heads per key/value group" in problem.message
    assert "num_attention_heads in [1, 2]" in problem.message


def test_heads_that_do_not_split_into_groups():
    spec = spec_for({"name": "g", "shape": {"num_attention_heads": 3, "hidden_size": 48}})
    [problem] = check_against_teacher(spec, tiny_config())
    assert problem.field == "students[0].shape.num_attention_heads"
    assert "does not split evenly into num_key_value_heads=2 groups" in problem.message


def test_a_student_that_is_not_smaller():
    [problem] = check_against_teacher(spec_for({"name": "same", "shape": {"hidden_size": 64}}), tiny_config())
    assert problem.field == "students[0].shape"
    assert "not fewer than the teacher's" in problem.message and "hidden_size=64" in problem.message


def test_a_parameter_budget_needs_a_search_section(tmp_path):
    problem = only_problem(tmp_path, changed(students=[{"name": "budget", "params": "90K"}]))
    assert "['budget']" in problem.message and "search: {tokens: 50M}" in problem.message


def test_a_parameter_budget_out_of_the_searchs_reach():
    spec = spec_for({"name": "budget", "params": "5K"}, search={"tokens": "1K", "width_multiple": 8})
    [problem] = check_against_teacher(spec, tiny_config())
    assert problem.field == "students[0].params" and problem.value == 5_000
    assert "no candidate shape lies within 5% of 5K" in problem.message and "the nearest are" in problem.message


def test_a_parameter_budget_above_the_teacher():
    spec = spec_for({"name": "budget", "params": "1M"}, search={"tokens": "1K"})
    [problem] = check_against_teacher(spec, tiny_config())
    assert "not below the teacher's 173K" in problem.message


def test_blocks_longer_than_the_teachers_context():
    spec = spec_for({"name": "w", "shape": {"hidden_size": 48}}, data={"seq_len": 1024})
    [problem] = check_against_teacher(spec, tiny_config())  # max_position_embeddings=512
    assert problem.field == "data.seq_len" and "data.seq_len <= 512" in problem.message


def test_an_unsupported_teacher_architecture():
    from transformers import GPT2Config

    [problem] = check_against_teacher(spec_for({"name": "w", "shape": {"hidden_size": 48}}), GPT2Config())
    assert problem.field == "teacher.source" and "'gpt2' is not supported" in problem.message


def test_an_unknown_lm_eval_task_suggests_the_name(fast_lm_eval_index):
    spec = spec_for({"name": "w", "shape": {"hidden_size": 48}},
                    evaluation={"tasks": [{"name": "arc_easy"}, {"name": "helaswag"}]})
    [problem] = check_against_teacher(spec, tiny_config())
    assert problem.field == "evaluation.tasks[1].name"
    assert "Unknown task 'helaswag'" in problem.message and "Did you mean 'hellaswag'?" in problem.message


def test_a_builtin_task_that_is_not_bundled_says_how_to_use_it(fast_lm_eval_index):
    spec = spec_for({"name": "w", "shape": {"hidden_size": 48}}, evaluation={"tasks": [{"name": "gsm8k"}]})
    [problem] = check_against_teacher(spec, tiny_config())
    assert problem.field == "evaluation.tasks[0].name" and "builtin" in problem.message


def test_every_phase_2_problem_is_listed_at_once(fast_lm_eval_index):
    spec = spec_for(
        {"name": "big", "shape": {"intermediate_size": 256}},
        {"name": "budget", "params": "5K"},
        {"name": "same", "shape": {"num_hidden_layers": 4}},
        search={"tokens": "1K"},
        data={"seq_len": 1024},
        evaluation={"tasks": [{"name": "helaswag"}]},
    )
    found = check_against_teacher(spec, tiny_config())
    assert [p.field for p in found] == [
        "students[0].shape.intermediate_size", "students[1].params", "students[2].shape",
        "data.seq_len", "evaluation.tasks[0].name",
    ]


def test_yaml_anchors_may_share_and_override_settings(tmp_path):
    text = """
family: tiny
teacher: {source: "embedded:smollm2-135m-instruct"}
distill: &defaults {tokens: 48K, learning_rate: 3.0e-4}
students:
  - name: tiny-width
    shape: {hidden_size: 48}
    distill:
      <<: *defaults
      tokens: 96K
"""
    spec = load_spec(write(tmp_path, text))
    assert spec.students[0].distill.tokens == 96_000 and spec.students[0].distill.learning_rate == 3e-4


def test_a_field_in_the_wrong_section_is_not_mistaken_for_a_similar_name(tmp_path):
    spec = changed()
    spec["tokens"] = "1B"
    problem = only_problem(tmp_path, spec)
    assert "'tokens' belongs under" in problem.message and "distill" in problem.message


def test_the_lm_loss_depth_method_needs_lm_loss_scores():
    student = {"name": "d", "shape": {"num_hidden_layers": 2}, "depth_method": "lm_loss"}
    [problem] = check_against_teacher(spec_for(student), tiny_config())
    assert problem.field == "students[0].depth_method" and "scoring.lm_loss_samples" in problem.message
    assert check_against_teacher(spec_for(student, scoring={"lm_loss_samples": 4}), tiny_config()) == []


# --- quality gates ---------------------------------------------------------------------


def test_gates_load_per_family_and_per_student(tmp_path):
    spec = load_spec(write(tmp_path, changed(
        gates={"min_score_ratio": {"hellaswag": 0.9}, "max_perplexity_ratio": 1.5},
        students=[{"name": "tiny-width", "shape": {"hidden_size": 48}},
                  {"name": "tiny-free", "shape": {"hidden_size": 32}, "gates": {}}])))
    gated, free = spec.students
    assert spec.gates_for(gated).min_score_ratio == {"hellaswag": 0.9} and spec.gates_for(gated).max_perplexity_ratio == 1.5
    assert spec.gates_for(free).is_empty  # a student's own gates replace the family's whole
    assert load_spec(write(tmp_path, minimal_spec())).gates.is_empty  # no gates unless asked for


def test_a_gate_on_a_task_the_family_does_not_evaluate(tmp_path):
    problem = only_problem(tmp_path, changed(gates={"min_score_ratio": {"arc_easy": 0.9}}))
    assert problem.field == "gates.min_score_ratio.arc_easy" and problem.value == 0.9
    assert "'arc_easy'" in problem.message and "it runs: hellaswag" in problem.message
    assert "add {name: arc_easy} to evaluation.tasks" in problem.message


def test_a_students_gate_on_perplexity_that_is_not_measured(tmp_path):
    spec = with_student(shape={"hidden_size": 48}, gates={"max_perplexity_ratio": 1.2})
    spec["evaluation"] = {**spec["evaluation"], "perplexity_tokens": 0}
    problem = only_problem(tmp_path, spec)
    assert problem.field == "students[0].gates.max_perplexity_ratio" and problem.value == 1.2
    assert "perplexity_tokens is 0" in problem.message and "remove this gate" in problem.message


@pytest.mark.parametrize("gates, field", [({"max_perplexity_ratio": 0}, "gates.max_perplexity_ratio"),
                                          ({"min_score_ratio": {"hellaswag": -1}}, "gates.min_score_ratio.hellaswag"),
                                          ({"min_ratio": 0.9}, "gates.min_ratio")])
def test_a_gate_out_of_range_or_misspelled_is_located(tmp_path, gates, field):
    assert only_problem(tmp_path, changed(gates=gates)).field == field
