"""`build-family SPEC --dry-run` through the real CLI: a bad spec exits with code 2, lists
every problem at once and runs nothing; a good one prints the plan and writes nothing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from builder.cli import main
from test_spec import fast_lm_eval_index  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = ROOT / "tests" / "data" / "configs" / "SmolLM2-135M-Instruct.json"

SCHEMA_MISTAKES = """
family: Tiny Family
teacher: {source: "embedded:smollm2-135m-instruct"}
distill: {tokens: 90 megas}
students:
  - name: width
    shape: {hiden_size: 448}
  - name: width
    shape: {hidden_size: 448}
    params: 90M
"""

TEACHER_MISTAKES = """
family: tiny
teacher: {source: "embedded:smollm2-135m-instruct"}
distill: {tokens: 48K}
search: {tokens: 4K}
students:
  - name: width
    shape: {hidden_size: 448}
  - name: budget
    params: 20M
  - name: wide
    shape: {intermediate_size: 2048}
evaluation:
  tasks: [{name: helaswag}]
"""

GOOD = """
family: tiny
teacher: {source: "embedded:smollm2-135m-instruct"}
distill: {tokens: 48K}
students:
  - name: width
    shape: {hidden_size: 504, intermediate_size: 960}
  - name: depth
    shape: {num_hidden_layers: 17}
evaluation:
  tasks: [{name: hellaswag, limit: 10}]
"""


def run(tmp_path: Path, text: str, capsys, *extra: str) -> tuple[int, str, str]:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(text)
    code = main([str(spec), "--workdir", str(tmp_path / "runs"), "--teacher-config", str(SMOLLM2_CONFIG), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def listed(err: str) -> list[str]:
    return [line.removeprefix("  - ") for line in err.splitlines() if line.startswith("  - ")]


def test_a_bad_spec_exits_2_listing_every_schema_problem(tmp_path, capsys):
    code, out, err = run(tmp_path, SCHEMA_MISTAKES, capsys, "--dry-run")
    assert code == 2 and out == ""
    assert "5 problems; nothing was run" in err
    fields = [line.split(": ", 1)[0] for line in listed(err)]
    assert fields == ["family", "distill.tokens", "students[0].shape.hiden_size", "students[1]", "students"]
    assert not (tmp_path / "runs").exists()


def test_a_bad_spec_exits_2_listing_every_problem_against_the_teacher(
        tmp_path, capsys, fast_lm_eval_index):  # noqa: F811
    code, out, err = run(tmp_path, TEACHER_MISTAKES, capsys, "--dry-run")
    assert code == 2 and out == ""
    problems = listed(err)
    assert [p.split(": ", 1)[0] for p in problems] == [
        "students[0].shape.hidden_size", "students[1].params", "students[2].shape.intermediate_size",
        "evaluation.tasks[0].name",
    ]
    assert "use hidden_size in [441, 450, 459]" in problems[0]
    assert "no candidate shape lies within 5% of 20M" in problems[1] and "search.tolerance" in problems[1]
    assert "larger than the teacher's 1536" in problems[2]
    assert "Did you mean 'hellaswag'?" in problems[3]
    assert not (tmp_path / "runs").exists()


def test_a_build_of_a_bad_spec_also_stops_before_running_anything(tmp_path, capsys):
    code, _, err = run(tmp_path, SCHEMA_MISTAKES, capsys)  # no --dry-run: Ray is never started
    assert code == 2 and "nothing was run" in err
    assert not (tmp_path / "runs").exists()


def test_a_good_spec_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    code, out, err = run(tmp_path, GOOD, capsys, "--dry-run")
    assert code == 0, err
    assert "Family tiny: teacher embedded:smollm2-135m-instruct" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["teacher"][1] == "135M"
    assert rows["width"][1:5] == ["91.6M", "0.68", "504", "960"]
    assert rows["depth"][1] == "88.5M" and rows["depth"][8] == "17"
    stages = [line for line in out.splitlines() if line.startswith("  [")]
    assert stages and all(line.startswith("  [todo]") for line in stages)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["schema"], ["--help"]])
def test_commands_that_need_no_spec(argv, capsys):
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    else:
        assert main(argv) == 0
    assert capsys.readouterr().out


def test_run_flags_reach_the_run_options(tmp_path):
    from builder.cli import options_from, parse_args

    options = options_from(parse_args(["spec.yaml", "--train-workers", "4", "--parallel", "fsdp",
                                       "--gpus-per-stage", "1", "--workdir", str(tmp_path)]))
    assert (options.train_workers, options.parallel, options.use_gpu) == (4, "fsdp", True)
    assert options.resolved_precision().dtype == "bfloat16"  # auto on GPUs
