"""Spec validation in two phases, every problem reported at once.

Phase 1 (offline): the schema (types, units, unknown fields) via pydantic.
Phase 2 (needs the teacher's config, not its weights): each student's shape is reachable
from the teacher and loadable by transformers and vLLM, each student is smaller than the
teacher, the lm-eval tasks exist.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from builder.errors import Problem, SpecError, problems_from_validation
from builder.spec import FamilySpec, load_yaml


def load_spec(path: Path) -> FamilySpec:
    """Parse and schema-check a spec file; raises SpecError listing every problem."""
    path = Path(path)
    if not path.exists():
        raise SpecError(str(path), [Problem("(file)", str(path), "does not exist; give the path of a family YAML")])
    try:
        raw = load_yaml(path)
    except Exception as error:  # a YAML syntax error: report it like any other problem
        raise SpecError(str(path), [Problem("(yaml)", None, f"is not valid YAML: {error}")]) from error
    if not isinstance(raw, dict):
        raise SpecError(str(path), [Problem("(spec)", raw, "must be a mapping with family, teacher, students ...")])
    try:
        return FamilySpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(str(path), problems_from_validation(error, FamilySpec)) from None


def check_against_teacher(spec: FamilySpec, teacher_config) -> list[Problem]:
    from builder.arch import UnsupportedArchitecture, arch_for, count_params

    try:
        arch_for(teacher_config)
    except UnsupportedArchitecture as error:
        return [Problem("teacher.source", spec.teacher.source, str(error))]
    teacher_params = count_params(teacher_config)
    problems = []
    for index, student in enumerate(spec.students):
        problems += _student_problems(index, student, teacher_config, teacher_params)
    problems += _task_problems(spec)
    return problems


def _student_problems(index: int, student, teacher_config, teacher_params: int) -> list[Problem]:
    from builder.arch import shape_problems
    from builder.plan import student_params, student_shape

    field = f"students[{index}]"
    if student.shape is None:
        return [Problem(f"{field}.params", student.params,
                        "architecture search by parameter budget is not implemented yet; give an "
                        "explicit `shape` (hidden_size, intermediate_size, num_attention_heads, "
                        "num_key_value_heads, num_hidden_layers)")]
    shape = student_shape(teacher_config, student)
    problems = [Problem(f"{field}.shape", student.shape.changes(), message)
                for message in shape_problems(teacher_config, shape)]
    if not problems and student_params(teacher_config, shape) >= teacher_params:
        problems.append(Problem(f"{field}.shape", student.shape.changes(),
                                f"is not smaller than the teacher ({teacher_params:,} parameters); "
                                "prune at least one axis"))
    return problems


def _task_problems(spec: FamilySpec) -> list[Problem]:
    from evaluators.lm_eval_runner import check_task_names

    names = [task.name for task in spec.evaluation.tasks]
    messages = check_task_names(names, source=spec.evaluation.task_source)
    return [Problem("evaluation.tasks", names, message) for message in messages]


def validate(spec_path: Path, teacher_config) -> FamilySpec:
    spec = load_spec(spec_path)
    problems = check_against_teacher(spec, teacher_config)
    if problems:
        raise SpecError(str(spec_path), problems)
    return spec
