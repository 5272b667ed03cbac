"""Spec problems, collected and reported all at once (the CLI exits with code 2).

pydantic finds every schema mistake in one pass; this module turns each of its errors into
a `Problem` that names the field (`students[1].shape.hidden_size`), the value and the fix.
pydantic's own wording ("Input should be a valid integer, unable to parse string as an
integer") says what is wrong but not what to write instead, so the common error types are
reworded here; our validators' ValueErrors already name value, rule and fix and pass through.
"""
from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class Problem:
    field: str  # dotted path in the YAML, e.g. students[1].shape.hidden_size
    value: object  # the offending value (None when the field is missing)
    message: str  # names the value, the rule and the fix

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecError(Exception):
    """A spec that cannot be built; `problems` lists every mistake found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        lines = [f"{source}: {count}; nothing was run:"]
        lines += [f"  - {problem}" for problem in problems]
        super().__init__("\n".join(lines))


def field_path(location: tuple) -> str:
    """('students', 1, 'shape', 'hidden_size') -> 'students[1].shape.hidden_size'."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(spec)"


def problems_from_validation(error: ValidationError, model: type[BaseModel]) -> list[Problem]:
    return [_problem(item, model) for item in error.errors()]


def _problem(item: dict, model: type[BaseModel]) -> Problem:
    location = tuple(part for part in item["loc"] if not _is_validator_tag(part))
    value = item.get("input")
    if item["type"] == "missing":
        return Problem(field_path(location), None, _missing_message(location, model))
    if item["type"] == "extra_forbidden":
        return Problem(field_path(location), value, _unknown_field_message(location, value, model))
    reword = _REWORDS.get(item["type"])
    message = reword(value, item.get("ctx") or {}, location, model) if reword else _pydantic_message(item)
    return Problem(field_path(location), value, message)


def _is_validator_tag(part: object) -> bool:
    # pydantic puts validator names such as 'function-before[parse_count(), ...]' in locations.
    return isinstance(part, str) and "[" in part and part.endswith("]")


def _pydantic_message(item: dict) -> str:
    message = item["msg"]
    if message.startswith("Value error, "):  # our validators: the message is complete
        return message.removeprefix("Value error, ")
    return f"{_lower_first(message)} (got {_short(item.get('input'))})"


# --- the reworded error types ---------------------------------------------------------


def _missing_message(location: tuple, model: type[BaseModel]) -> str:
    field = _field_info(location, model)
    what = f" ({_lower_first(field.description)})" if field is not None and field.description else ""
    return f"is required{what}; add it (see families/spec.schema.json or families/smollm2-135m.yaml)"


def _unknown_field_message(location: tuple, value: object, model: type[BaseModel]) -> str:
    name = str(location[-1])
    parent = _model_at(location[:-1], model)
    allowed = sorted(parent.model_fields) if parent else []
    # A real field at the wrong level (`tokens` at the top) beats a fuzzy guess (`teacher`).
    elsewhere = [path for path in _paths_of(name, model) if path != _generic(location[:-1])]
    guess = [_ALIASES[name]] if _ALIASES.get(name) in allowed else difflib.get_close_matches(name, allowed, n=1)
    if elsewhere:
        hint = f"{name!r} belongs under {' or '.join(elsewhere)}; move it there. "
    elif guess:
        hint = f"did you mean {guess[0]!r}? "
    else:
        hint = ""
    return f"unknown field {name!r}; {hint}allowed here: {', '.join(allowed)}"


# Names users bring from papers, Megatron/NeMo and modelopt configs, which difflib cannot
# match to the config.json names the spec uses.
_ALIASES = {
    "lr": "learning_rate", "hidden": "hidden_size", "emb": "hidden_size", "embedding": "hidden_size",
    "mlp": "intermediate_size", "ffn": "intermediate_size", "ffn_hidden_size": "intermediate_size",
    "heads": "num_attention_heads", "num_heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "num_query_groups": "num_key_value_heads",
    "layers": "num_hidden_layers", "num_layers": "num_hidden_layers", "depth": "num_hidden_layers",
    "budget": "params", "num_params": "params", "model": "source", "dataset": "source",
}


def _integer(value, ctx, location, model) -> str:
    if isinstance(value, float):
        return f"{value!r} is not a whole number; write an integer such as {int(value)}"
    units = " (shapes are exact sizes, so no K or M units)" if "shape" in location else ""
    return f"{value!r} is not a whole number; write an integer in digits{units}"


def _number(value, ctx, location, model) -> str:
    return f"{value!r} is not a number; write e.g. 0.5 or 1.0e-4"


def _boolean(value, ctx, location, model) -> str:
    return f"{value!r} is not true or false; write true or false"


def _text(value, ctx, location, model) -> str:
    return f"{value!r} is not text; put it in quotes, e.g. '{value}'"


def _bound(symbol: str, key: str):
    size = "small" if symbol.startswith(">") else "large"

    def message(value, ctx, location, model) -> str:
        return f"{value!r} is too {size}; use a number {symbol} {ctx.get(key)}"

    return message


def _literal(value, ctx, location, model) -> str:
    allowed = _literal_values(location, model)
    if not allowed:  # cannot find the annotation: pydantic's list is still correct
        return f"{value!r} is not allowed; use one of: {ctx.get('expected')}"
    guess = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return f"{value!r} is not allowed; {hint}use one of: {', '.join(allowed)}"


def _mapping(value, ctx, location, model) -> str:
    target = _model_at(location, model)
    if target is None:
        return f"{value!r} is not a mapping; write `key: value` pairs, one per line (or {{key: value}})"
    required = [name for name, field in target.model_fields.items() if field.is_required()]
    scalar = isinstance(value, (str, int, float))
    example = f" such as {{{required[0]}: {value}}}" if len(required) == 1 and scalar else ""
    return (f"{_short(value)} is not a mapping; write it as fields{example} "
            f"(allowed: {', '.join(sorted(target.model_fields))})")


def _sequence(value, ctx, location, model) -> str:
    return f"{_short(value)} is not a list; write one item per line, each starting with '- '"


def _empty_text(value, ctx, location, model) -> str:
    field = _field_info(location, model)
    what = f": {_lower_first(field.description)}" if field is not None and field.description else ""
    return f"{value!r} is empty; write a value{what}"


def _too_short(value, ctx, location, model) -> str:
    count = len(value) if hasattr(value, "__len__") else 0
    return f"needs at least {ctx.get('min_length')} item(s), got {count}; add one (see families/smollm2-135m.yaml)"


_REWORDS = {
    "int_parsing": _integer, "int_type": _integer, "int_from_float": _integer,
    "float_parsing": _number, "float_type": _number,
    "bool_parsing": _boolean, "bool_type": _boolean,
    "string_type": _text,
    "greater_than": _bound(">", "gt"), "greater_than_equal": _bound(">=", "ge"),
    "less_than": _bound("<", "lt"), "less_than_equal": _bound("<=", "le"),
    "literal_error": _literal,
    "model_type": _mapping, "model_attributes_type": _mapping, "dict_type": _mapping,
    "list_type": _sequence,
    "too_short": _too_short,
    "string_too_short": _empty_text,
}


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- walking the models along a location ----------------------------------------------


def _model_at(location: tuple, model: type[BaseModel]) -> type[BaseModel] | None:
    """The model that validates the value at `location` (list indexes are skipped)."""
    current: type[BaseModel] | None = model
    for part in location:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current else None
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current


def _field_info(location: tuple, model: type[BaseModel]):
    names = [part for part in location if not isinstance(part, int)]
    parent = _model_at(location[:-1], model) if names else None
    return parent.model_fields.get(names[-1]) if parent else None


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _literal_values(location: tuple, model: type[BaseModel]) -> list[str]:
    field = _field_info(location, model)
    return [str(value) for value in _literal_args(field.annotation)] if field else []


def _literal_args(annotation: object) -> tuple:
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(value for arg in typing.get_args(annotation) for value in _literal_args(arg))


def _paths_of(name: str, model: type[BaseModel], prefix: str = "", seen: tuple = ()) -> list[str]:
    """Where a field called `name` is allowed, e.g. ['students[].shape'] for 'hidden_size'."""
    paths = [prefix or "the top level"] if name in model.model_fields else []
    for field_name, field in model.model_fields.items():
        child = _model_in(field.annotation)
        if child is None or child in seen:
            continue
        is_list = typing.get_origin(field.annotation) is list
        child_prefix = (f"{prefix}." if prefix else "") + field_name + ("[]" if is_list else "")
        paths += _paths_of(name, child, child_prefix, seen + (model,))
    return paths


def _generic(location: tuple) -> str:
    """('students', 1, 'shape') -> 'students[].shape', the form `_paths_of` returns."""
    path = ""
    for part in location:
        path += "[]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "the top level"
