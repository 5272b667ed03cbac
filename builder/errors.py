"""Spec problems, collected and reported all at once (the CLI exits with code 2)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class Problem:
    field: str  # dotted path in the YAML, e.g. students[1].shape.hidden_size
    value: object
    message: str  # says the rule and the fix

    def __str__(self) -> str:
        return f"{self.field}: {self.message} (got {self.value!r})"


class SpecError(Exception):
    """A spec that cannot be built; `problems` lists every mistake found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s); nothing was run:"]
        lines += [f"  - {problem}" for problem in problems]
        super().__init__("\n".join(lines))


def field_path(location: tuple) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(spec)"


def problems_from_validation(error: ValidationError, model: type[BaseModel]) -> list[Problem]:
    return [_problem(item, model) for item in error.errors()]


def _problem(item: dict, model: type[BaseModel]) -> Problem:
    location = tuple(part for part in item["loc"] if not _is_union_tag(part))
    path = field_path(location)
    if item["type"] == "extra_forbidden":
        return Problem(path, item["input"], _unknown_field_message(location, model))
    if item["type"] == "missing":
        return Problem(path, None, "is required; add it (see families/spec.schema.json)")
    message = item["msg"].removeprefix("Value error, ")
    return Problem(path, item.get("input"), message)


def _is_union_tag(part: object) -> bool:
    # pydantic adds validator names such as 'function-before[...]' to locations.
    return isinstance(part, str) and ("[" in part and part.endswith("]"))


def _unknown_field_message(location: tuple, model: type[BaseModel]) -> str:
    allowed = _allowed_fields(location[:-1], model)
    guess = difflib.get_close_matches(str(location[-1]), allowed, n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return f"unknown field; {hint}allowed here: {', '.join(allowed)}"


def _allowed_fields(parent: tuple, model: type[BaseModel]) -> list[str]:
    """Walk the models along `parent` to list the fields allowed where the typo was."""
    current: object = model
    for part in parent:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: object) -> object:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
