"""RunOptions as `build-family` flags, made from its fields (as mergekit's options.py makes
click options from its MergeOptions): the flag (--FIELD-NAME unless the field names another),
its type and choices from the annotation, its default and help from the field.

    add_flags(build_parser, every_command_only=False)   # every run option
    add_flags(status_parser, every_command_only=True)   # those status/report/publish take
    options = options_from(parser.parse_args(argv))
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Literal

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from builder.options.run_options import RunOptions


def add_flags(parser: argparse.ArgumentParser, every_command_only: bool) -> None:
    """One flag per RunOptions field; with `every_command_only`, only the fields marked
    EVERY_COMMAND (the rest are build's alone)."""
    for name, info in RunOptions.model_fields.items():
        if not every_command_only or _extra(info).get("every_command"):
            parser.add_argument(flag_of(name), dest=name, **_argument(name, info))


class FlagError(ValueError):
    """A flag's value the run options refuse (the CLI exits with code 2, as argparse does)."""


def options_from(args: argparse.Namespace) -> RunOptions:
    """The run options a parsed command line gave; a field without a flag on this command
    (status has no --verbose) takes RunOptions' default. A value the model refuses raises
    FlagError naming the flag, the value and the rule."""
    given = vars(args)
    try:
        return RunOptions(**{name: given[name] for name in RunOptions.model_fields if name in given})
    except ValidationError as error:
        raise FlagError("; ".join(_flag_problem(problem, given) for problem in error.errors())) from None


def _flag_problem(problem: dict, given: dict) -> str:
    name = str(problem["loc"][0]) if problem["loc"] else ""
    if name not in RunOptions.model_fields:
        return problem["msg"]
    # A validator's own ValueError already says the rule and the fix: its text, without
    # pydantic's "Value error, " in front.
    message = str(problem["ctx"]["error"]) if problem["type"] == "value_error" else problem["msg"]
    return f"{flag_of(name)} {given.get(name)}: {message[0].lower()}{message[1:]}"


def flag_of(name: str) -> str:
    return _extra(RunOptions.model_fields[name]).get("flag", "--" + name.replace("_", "-"))


def _argument(name: str, info: FieldInfo) -> dict:
    value_type, choices = _value_type(name, info.annotation)
    help_text = info.description.replace("%", "%%")  # argparse formats help with %
    if value_type is bool:
        if info.default is not False:
            raise TypeError(f"RunOptions.{name} defaults to {info.default!r}; a bool option is a switch that "
                            "turns something on, so it must default to False")
        return {"action": "store_true", "help": help_text}
    if info.default is not None:
        help_text += f" (default: {info.default})"
    return {"type": value_type, "choices": choices, "default": info.default, "help": help_text}


def _value_type(name: str, annotation: object) -> tuple[type, tuple | None]:
    """(the type argparse converts the flag's text to, the allowed values or None)."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        not_none = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(not_none) == 1:
            return _value_type(name, not_none[0])
    if isinstance(annotation, type):
        return annotation, None
    raise TypeError(f"RunOptions.{name} is {annotation}; a flag needs one type, a Literal of choices, or either "
                    "or None: split the option or give it one of those types")


def _extra(info: FieldInfo) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
