"""Run options and their flags come from one model (builder.options.run_options.RunOptions;
builder.options.flags makes the flags): every field is a flag with its help, a flag's default
is the field's, and each flag sets its own field and no other.

Run: .venv/bin/pytest tests/test_run_options.py -q   (a few seconds)
"""
from __future__ import annotations

import typing
from pathlib import Path

import pytest

from builder.cli import main, parse_args
from builder.options.flags import flag_of, options_from
from builder.options.precision import PRECISIONS
from builder.options.run_options import EVERY_COMMAND, Gpu, RequestedPrecision, RunOptions
from builder.planning.cost_model import ACCELERATORS

FIELDS = RunOptions.model_fields
# One non-default value per field, as typed on the command line, and what the field holds.
OTHER_VALUES = {
    "workdir": (["--workdir", "elsewhere"], Path("elsewhere").resolve()),
    "teacher_config": (["--teacher-config", "teacher.json"], Path("teacher.json")),
    "precision": (["--precision", "bfloat16"], "bfloat16"),
    "verbose": (["--verbose"], True),
    "gpu": (["--gpu", "a100"], "a100"),
    "mfu": (["--mfu", "0.25"], 0.25),
    "disk_gbps": (["--disk-gbps", "1.5"], 1.5),
    "rehearsal": (["--rehearse"], True),
    "address": (["--address", "ray://head:10001"], "ray://head:10001"),
    "cpus_per_stage": (["--cpus-per-stage", "3"], 3),
    "gpus_per_stage": (["--gpus-per-stage", "2"], 2.0),
    "train_workers": (["--train-workers", "4"], 4),
    "parallel": (["--parallel", "fsdp"], "fsdp"),
    "activation_checkpointing": (["--activation-checkpointing"], True),
    "local_cpus": (["--local-cpus", "2"], 2),
    "connect_timeout_s": (["--connect-timeout", "5"], 5.0),
}


def _help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return "".join(capsys.readouterr().out.split())  # argparse wraps lines: compare without whitespace


def test_every_run_option_is_a_build_flag_with_its_help(capsys):
    text = _help_text("build", capsys)
    for name, info in FIELDS.items():
        assert info.description, f"RunOptions.{name} has no help text"
        assert flag_of(name) in text and "".join(info.description.split()) in text, name


@pytest.mark.parametrize("command", ["status", "report", "publish"])
def test_commands_reading_a_run_take_the_every_command_options(command, capsys):
    text = _help_text(command, capsys)
    for name, info in FIELDS.items():
        assert (flag_of(name) in text) == (info.json_schema_extra == EVERY_COMMAND), (command, name)
    assert options_from(parse_args([command, "spec.yaml"])) == RunOptions()


def test_a_flags_default_is_the_models():
    args = parse_args(["spec.yaml"])
    for name, info in FIELDS.items():
        assert getattr(args, name) == info.default, name
    assert options_from(args) == RunOptions()


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_each_flag_sets_its_field_and_no_other(name):
    argv, expected = OTHER_VALUES[name]
    options = options_from(parse_args(["spec.yaml", *argv]))
    assert getattr(options, name) == expected != getattr(RunOptions(), name)
    assert options.model_copy(update={name: getattr(RunOptions(), name)}) == RunOptions()


def test_every_field_has_a_flag_value_here():
    assert OTHER_VALUES.keys() == FIELDS.keys()


def test_choices_are_what_the_code_knows():
    assert set(typing.get_args(Gpu)) == set(ACCELERATORS)
    assert typing.get_args(RequestedPrecision) == ("auto", *PRECISIONS)


def test_the_workdir_is_absolute_wherever_options_are_made():
    assert RunOptions().workdir == Path("runs").resolve()
    assert RunOptions(workdir=Path("a/../b")).workdir == Path("b").resolve()


def test_rehearse_runs_a_rehearsal_with_the_other_options(monkeypatch):
    import builder.rehearse

    seen = []
    monkeypatch.setattr(builder.rehearse, "rehearse", lambda spec, options: seen.append((spec, options)) or 0)
    assert main(["spec.yaml", "--rehearse", "--train-workers", "2"]) == 0
    assert seen == [(Path("spec.yaml"), RunOptions(rehearsal=True, train_workers=2))]


def test_a_value_the_options_refuse_exits_2_naming_the_flag(capsys):
    assert main(["spec.yaml", "--connect-timeout", "0", "--dry-run"]) == 2
    assert "--connect-timeout 0.0: input should be greater than 0" in capsys.readouterr().err


@pytest.mark.parametrize("gpus", ["0.5", "1.5", "-1"])
def test_a_share_of_a_gpu_is_refused_with_the_fix(gpus, capsys):
    """Two stages on one GPU would each size vLLM for the whole of it (issue 21)."""
    assert main(["spec.yaml", "--gpus-per-stage", gpus, "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert f"--gpus-per-stage {float(gpus)}: a stage holds whole GPUs" in error
    assert "give a whole number: 1 runs one heavy stage per GPU" in error
