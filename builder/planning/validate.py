"""Spec validation in two phases, every problem reported at once.

Phase 1 (offline): the schema (types, units, unknown fields) via pydantic; then every local
path is made absolute against the spec's folder (`builder.spec.schema.resolve_paths`) and checked:
it exists, can be read and holds what it should; every quality gate names a task the family
evaluates, and a perplexity gate has perplexity to judge.
Phase 2 (needs the teacher's config, not its weights): each student's shape is reachable
from the teacher (a chained student's from its parent: no axis above the parent's) and
loadable by transformers and vLLM, each student is smaller than the teacher (or its parent), training blocks fit the teacher's context, the lm-eval tasks exist, a depth
method that needs LM-loss scores has them, and each quantized variant can be made and served
for every model it is made of (the quantizer's environment exists: `quantizer_problems`).
"""
from __future__ import annotations

import importlib.util

import os
from pathlib import Path

from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from builder.errors import Problem, SpecError, problems_from_validation
from builder.models.llama_cpp import llama_cpp_problem
from builder.models.quantizer_env import quantizer_problem
from builder.models.variants import variant_problem
from builder.spec.shape import Shape
from builder.spec.schema import (DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K, FamilySpec, GatesSpec, StudentSpec,
                                duplicate_students_message, duplicates, load_yaml, resolve_paths)

if TYPE_CHECKING:
    from builder.planning.dag import Plan

_RELATIVE_HINT = "(a relative path starts at the spec file's folder)"


def load_spec(path: Path) -> FamilySpec:
    """Parse and schema-check a spec file, its local paths made absolute; raises SpecError
    listing every problem."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise SpecError(str(path), [Problem("(file)", str(path), f"{path} {what}; give the path of a family "
                                            "YAML file, e.g. families/smollm2-135m.yaml")])
    try:
        raw = load_yaml(path)
    except yaml.YAMLError as error:
        raise SpecError(str(path), [_yaml_problem(error)]) from None
    if not isinstance(raw, dict):
        raise SpecError(str(path), [_not_a_mapping(raw)])
    try:
        spec = FamilySpec.model_validate(raw)
    except ValidationError as error:
        problems = problems_from_validation(error, FamilySpec)
        raise SpecError(str(path), problems + _unreached_problems(raw, problems)) from None
    problems = gate_problems(spec)
    if problems:
        raise SpecError(str(path), problems)
    return resolve_paths(spec, path.parent)


def gate_problems(spec: FamilySpec) -> list[Problem]:
    """Gates that could never be judged: on a task the family does not evaluate, or on
    perplexity when none is measured. Found here, a build never runs for hours toward a
    verdict it cannot reach."""
    problems = _section_gate_problems(spec, spec.gates, "gates")
    for index, student in enumerate(spec.students):
        if student.gates is not None:
            problems += _section_gate_problems(spec, student.gates, f"students[{index}].gates")
    return problems


def _section_gate_problems(spec: FamilySpec, gates: GatesSpec, where: str) -> list[Problem]:
    evaluated = [task.name for task in spec.evaluation.tasks]
    listed = ", ".join(evaluated) or "none"
    problems = [Problem(f"{where}.min_score_ratio.{task}", floor,
                        f"gates task {task!r}, which evaluation.tasks does not run (it runs: {listed}); add "
                        f"{{name: {task}}} to evaluation.tasks or remove this gate")
                for task, floor in gates.min_score_ratio.items() if task not in evaluated]
    if gates.max_perplexity_ratio is not None and spec.evaluation.perplexity_tokens == 0:
        problems.append(Problem(f"{where}.max_perplexity_ratio", gates.max_perplexity_ratio,
                                "gates perplexity, but evaluation.perplexity_tokens is 0 (perplexity is not "
                                "measured); set evaluation.perplexity_tokens (e.g. 64K) or remove this gate"))
    return problems


def _yaml_problem(error: yaml.YAMLError) -> Problem:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
    what = getattr(error, "problem", None) or str(error)
    if isinstance(error, yaml.constructor.ConstructorError):  # e.g. a repeated key: says its fix
        return Problem(where, None, what)
    context = getattr(error, "context", None)
    detail = f"{what} ({context})" if context else what
    return Problem(where, None, f"is not valid YAML: {detail}; fix the syntax there (indentation, "
                                "a missing ':', an unclosed quote or bracket)")


def _not_a_mapping(raw: object) -> Problem:
    if raw is None:
        return Problem("(spec)", None, "the file is empty; write a family spec "
                                       "(start from families/smollm2-135m.yaml)")
    return Problem("(spec)", raw, f"the file holds a {type(raw).__name__}, not a mapping; a family spec is "
                                  "`key: value` lines: family, teacher, data, distill, students, ...")


def _unreached_problems(raw: dict, found: list[Problem]) -> list[Problem]:
    """Checks pydantic skips when a student has an error: repeated student names.

    The family-level uniqueness check only runs once every student is valid, yet a
    user fixing one student should hear about the repeated name in the same run.
    """
    students = raw.get("students")
    if not isinstance(students, list) or any(p.field == "students" for p in found):
        return []
    names = [s.get("name") for s in students if isinstance(s, dict) and isinstance(s.get("name"), str)]
    repeated = duplicates(names)
    return [Problem("students", names, duplicate_students_message(repeated))] if repeated else []


def local_source_problems(spec: FamilySpec) -> list[Problem]:
    """A local teacher or data path that is missing, unreadable or empty, found before any
    stage runs (the build would otherwise fail minutes in). Paths are absolute here."""
    problems = []
    if spec.teacher.reference.kind == "path":
        message = _teacher_folder_problem(Path(spec.teacher.source))
        problems += [Problem("teacher.source", spec.teacher.source, message)] if message else []
    if spec.data.reference.kind == "path":
        message = _data_path_problem(Path(spec.data.source), spec.data.text_field)
        problems += [Problem("data.source", spec.data.source, message)] if message else []
    return problems


def _teacher_folder_problem(folder: Path) -> str | None:
    fix = ("point teacher.source at a Hugging Face checkpoint folder (config.json, *.safetensors and "
           f"tokenizer files) {_RELATIVE_HINT}")
    if not folder.exists():
        return f"{folder} does not exist; {fix}"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder; {fix}"
    config = folder / "config.json"
    for path in (folder, config):
        if path.exists() and not _readable(path):
            return _unreadable(path)
    if not config.is_file():
        return f"{folder} has no config.json; {fix}"
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return f"{folder} holds no weights (*.safetensors or *.bin); {fix}"
    return None


def _data_path_problem(path: Path, text_field: str) -> str | None:
    # pyarrow: only for a local data source
    from builder.data.documents import LOCAL_DATA_SUFFIXES, local_data_files

    kinds = ", ".join(LOCAL_DATA_SUFFIXES[:-1]) + " or " + LOCAL_DATA_SUFFIXES[-1]
    fix = f"give a {kinds} file or a folder of them ({text_field!r} holds the text of .jsonl lines) {_RELATIVE_HINT}"
    if not path.exists():
        return f"{path} does not exist; {fix}"
    if not _readable(path):
        return _unreadable(path)
    files = local_data_files(path)
    if not files:
        what = "holds no" if path.is_dir() else "is not a"
        return f"{path} {what} {kinds} file; {fix}"
    unreadable = [f for f in files if not _readable(f)]
    if unreadable:
        return (f"{len(unreadable)} of its {len(files)} files cannot be read by this user, e.g. {unreadable[0]}; "
                "fix the permissions (chmod)")
    if all(f.stat().st_size == 0 for f in files):
        sizes = f"every {kinds} file in it has 0 bytes" if path.is_dir() else "0 bytes"
        return f"{path} is empty ({sizes}); {fix}"
    return None


def _readable(path: Path) -> bool:
    """Readable by this user (a folder also searchable: its files can be opened)."""
    return os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))


def _unreadable(path: Path) -> str:
    return f"{path} cannot be read by this user; fix its permissions (chmod) or copy it"


def check_against_teacher(spec: FamilySpec, teacher_config) -> list[Problem]:
    """Phase 2: every problem the teacher's config reveals (it needs no weights)."""
    # transformers: phase 2 only (phase 1 checks the schema without it)
    from builder.models.arch import UnsupportedArchitecture, arch_for

    try:
        arch_for(teacher_config)
    except UnsupportedArchitecture as error:
        return [Problem("teacher.source", spec.teacher.source, str(error))]
    problems, failed = [], set()
    for index, student in enumerate(spec.students):
        if student.parent in failed:  # its parent's problems are reported; its shape is unknown until fixed
            failed.add(student.name)
            continue
        found = _student_problems(spec, index, student, teacher_config)
        failed |= {student.name} if found else set()
        problems += found
    problems += _depth_method_problems(spec)
    problems += _context_problems(spec, teacher_config)
    problems += _top_k_problems(spec, teacher_config)
    problems += _task_problems(spec)
    problems += _variant_problems(spec, teacher_config, failed)
    return problems


def _variant_problems(spec: FamilySpec, teacher_config, failed: set[str]) -> list[Problem]:
    """Each variant against every model it is made of: the teacher, each shaped student, and
    every candidate of a searched student (any may be chosen); not the `failed` students, whose
    shapes are reported already."""
    shapes = _variant_shapes(spec, teacher_config, failed)
    problems = []
    for index, variant in enumerate(spec.variants):
        for model, shape in shapes.items():
            message = variant_problem(variant, shape)
            if message:
                problems.append(Problem(f"variants[{index}]", variant.scheme, f"{model}: {message}"))
    return problems


def _variant_shapes(spec: FamilySpec, teacher_config, failed: set[str]) -> dict[str, Shape]:
    # transformers: phase 2 only
    from builder.planning.dag import source_config, student_shape
    from builder.pruning.budgets import budget_candidates

    shapes = {"teacher": Shape.of(teacher_config)} if spec.variants else {}
    for student in [s for s in spec.students if s.name not in failed] if spec.variants else ():
        source = source_config(spec, teacher_config, student)  # a chained student is cut from its parent
        if student.shape is not None:
            shapes[student.name] = student_shape(source, student)
            continue
        for candidate in budget_candidates(source, student, spec.search):
            shapes[f"{student.name} (search candidate {candidate.tag})"] = candidate.shape
    return shapes


def quantizer_problems(spec: FamilySpec) -> list[Problem]:
    """Compressed-tensors variants need the quantizer's own environment (builder.models.quantizer_env)
    to be made and vLLM in this one to be served and evaluated (the engine that serves them; a
    variant is never evaluated in another); GGUF ones need llama.cpp's tools (builder.models.llama_cpp).
    Any of them missing is a spec problem before anything runs, not a failure once the students are built."""
    problems = []
    for gguf, checks in ((False, (quantizer_problem, _vllm_problem)), (True, (llama_cpp_problem,))):
        schemes = [variant.scheme for variant in spec.variants if variant.is_gguf == gguf]
        messages = [check() for check in checks] if schemes else []
        problems += [Problem("variants", schemes, f"{', '.join(schemes)}: {message}" if gguf else message)
                     for message in messages if message]  # GGUF's names the missing files: say which variants need them
    return problems


def _vllm_problem() -> str | None:
    """Whether vLLM is installed here (found, not imported: an import takes seconds)."""
    if importlib.util.find_spec("vllm") is not None:
        return None
    # torch's build names the wheel to install; evaluators.throughput imports torch: phase 2 only
    from evaluators.throughput import install_hint

    return ("the compressed-tensors variants are evaluated and measured in vLLM, the engine that serves them, "
            f"which this environment does not have; install it with `{install_hint()}`, or remove those variants")


def _student_problems(spec: FamilySpec, index: int, student: StudentSpec, teacher_config) -> list[Problem]:
    # transformers: phase 2 only (phase 1 checks the schema without it)
    from builder.models.arch import count_params, shape_problems
    from builder.planning.dag import source_config, student_params, student_shape
    from builder.pruning.budgets import budget_candidates
    from builder.pruning.search import search_problem

    field, source = f"students[{index}]", source_config(spec, teacher_config, student)
    if student.shape is None and student.params is not None:  # a budget: the architecture search must have candidates
        message = search_problem(source, student.params, spec.search)
        return [Problem(f"{field}.params", student.params, message)] if message else []
    if student.shape is None:  # a serving budget alone: candidates anywhere on the grid
        if budget_candidates(source, student, spec.search):
            return []
        return [Problem(f"{field}.budget", student.budget.limits(),
                        f"the search grid has no candidate shape below {_source_name(student)} size (axes "
                        f"{', '.join(spec.search.axes)}, width_multiple {spec.search.width_multiple}); add axes to "
                        "search.axes or lower search.width_multiple")]
    problems = _larger_than_parent(field, student, source)
    shape = student_shape(source, student)
    problems = problems or [_shape_problem(field, student, message) for message in shape_problems(source, shape)]
    if not problems:
        params, source_params = student_params(source, shape), count_params(source)
        if params >= source_params:
            problems.append(Problem(f"{field}.shape", student.shape.changes(),
                                    f"{student.shape.changes()} gives {params:,} parameters, not fewer than "
                                    f"{_source_name(student)} {source_params:,}; set at least one field below "
                                    f"{_source_name(student)} {_teacher_values(source, student)}"))
    return problems


def budget_problems(plan: Plan) -> list[Problem]:
    """Phase 3, once the serving budgets' candidates are measured: a budget no candidate meets
    (the nearest with their numbers, and what to change). Before any training stage runs."""
    # transformers (builder.models.arch, under both): after planning only, as phase 2's imports above
    from builder.pruning.budgets import infeasible_message
    from builder.stages.measure_serving import describe_hardware_identity

    problems = []
    for index, student in enumerate(plan.students):
        budget = student.budget
        if budget is None or not budget.measured_all or student.candidates:
            continue
        message = infeasible_message(student.spec, list(zip(budget.measured, budget.costs)), plan.spec.serving,
                                     describe_hardware_identity(budget.hardware))
        problems.append(Problem(f"students[{index}].budget", student.spec.budget.limits(), message))
    return problems


def _source_name(student: StudentSpec) -> str:
    return f"its parent {student.parent!r}'s" if student.parent else "the teacher's"


def _larger_than_parent(field: str, student: StudentSpec, source) -> list[Problem]:
    """A chained student is cut out of its parent, so no axis can grow past the parent's."""
    if student.parent is None:
        return []
    parent = Shape.of(source)
    return [Problem(f"{field}.shape.{name}", value,
                    f"{name}={value} is more than its parent {student.parent!r}'s {getattr(parent, name)}, but a "
                    f"chained student is pruned from its parent, so every axis is at most the parent's; use {name} "
                    f"<= {getattr(parent, name)}, or chain from a larger student (or remove `from`: the teacher)")
            for name, value in student.shape.changes().items() if value > getattr(parent, name)]


def _shape_problem(field: str, student: StudentSpec, message: str) -> Problem:
    """Point at the shape field a message is about when the user set that field.

    builder.models.arch's messages start with `name=value`; a field the user did not set (it keeps
    the teacher's value) is reported on the whole shape.
    """
    name = message.split("=", 1)[0]
    if name in student.shape.changes():
        return Problem(f"{field}.shape.{name}", student.shape.changes()[name], message)
    return Problem(f"{field}.shape", student.shape.changes(), message)


def _teacher_values(teacher_config, student: StudentSpec) -> str:
    teacher = Shape.of(teacher_config)
    return ", ".join(f"{name}={getattr(teacher, name)}" for name in student.shape.changes())


def _depth_method_problems(spec: FamilySpec) -> list[Problem]:
    """The LM-loss depth metric exists only when scoring measured it (one spec section
    depends on another, so pydantic's per-section checks cannot see it)."""
    if spec.scoring.lm_loss_samples > 0:
        return []
    return [Problem(f"students[{index}].depth_method", student.depth_method,
                    "depth_method 'lm_loss' needs LM-loss layer scores, but scoring.lm_loss_samples is 0; "
                    "set scoring.lm_loss_samples (e.g. 64) or pick another depth_method")
            for index, student in enumerate(spec.students) if student.depth_method == "lm_loss"]


def _context_problems(spec: FamilySpec, teacher_config) -> list[Problem]:
    """Blocks longer than the teacher's context would train positions it never learned."""
    limit = getattr(teacher_config, "max_position_embeddings", None)
    if limit is None or spec.data.seq_len <= limit:
        return []
    return [Problem("data.seq_len", spec.data.seq_len,
                    f"{spec.data.seq_len:,} tokens per block is longer than the teacher's context "
                    f"(max_position_embeddings={limit:,}); use data.seq_len <= {limit}")]


def _top_k_problems(spec: FamilySpec, teacher_config) -> list[Problem]:
    """A stored signal keeps at most the teacher's whole vocabulary."""
    sections = [("distill", spec.distill)] + [(f"students[{index}].distill", student.distill)
                                              for index, student in enumerate(spec.students) if student.distill]
    vocab = teacher_config.vocab_size
    oversized = [(field, section) for field, section in sections
                 if section.teacher_signal == "topk" and section.top_k > vocab]
    if not oversized:
        return []
    hint = _default_signal_size()
    return [Problem(f"{field}.top_k", section.top_k,
                    f"top_k {section.top_k:,} is more than the teacher's vocabulary ({vocab:,} token ids); use "
                    f"top_k <= {vocab} ({hint}), or teacher_signal: online")
            for field, section in oversized]


def _default_signal_size() -> str:
    """The default signal's size, from the defaults themselves (a hint that named the numbers
    went stale once when they changed)."""
    from builder.teaching.signal import bytes_per_token  # imports torch: only to explain a problem

    small, large = (bytes_per_token(DEFAULT_TOP_K, vocab, DEFAULT_TAIL_SAMPLES) for vocab in (1 << 16, (1 << 16) + 1))
    return (f"the default {DEFAULT_TOP_K}, with {DEFAULT_TAIL_SAMPLES} tail draws, keeps {small} bytes per token; "
            f"{large} above 65536 ids")


def _task_problems(spec: FamilySpec) -> list[Problem]:
    # lm-eval and torch: only when the spec names tasks
    from evaluators.lm_eval_runner import check_task_names

    names = [task.name for task in spec.evaluation.tasks]
    messages = check_task_names(names, source=spec.evaluation.task_source)
    return [_task_problem(names, message) for message in messages]


def _task_problem(names: list[str], message: str) -> Problem:
    """Locate a message at the task it is about: the name quoted first in it (the runner's
    messages open with the task's name; later quotes are suggestions)."""
    positions = {index: message.find(repr(name)) for index, name in enumerate(names)}
    found = {index: position for index, position in positions.items() if position >= 0}
    if not found:
        return Problem("evaluation.tasks", names, message)
    index = min(found, key=lambda i: (found[i], -i))  # a repeated name: point at its last entry
    return Problem(f"evaluation.tasks[{index}].name", names[index], message)


def validate(spec_path: Path, teacher_config) -> FamilySpec:
    """Both phases for one spec file; raises SpecError listing every problem."""
    spec = load_spec(spec_path)
    problems = check_against_teacher(spec, teacher_config)
    if problems:
        raise SpecError(str(spec_path), problems)
    return spec
