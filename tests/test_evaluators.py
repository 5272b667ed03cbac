"""The evaluator interface (evaluators.base), its registry, and the evaluate stage running
lm-eval and perplexity on one load of the model, with the results of separate runs."""
from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import torch

import builder.models.loading
from block_files import write_blocks
from builder.options.run_options import RunOptions
from builder.planning.cost_model import COSTS, Work
from builder.planning.dag import stage_key
from builder.spec.schema import EvaluationSpec, TaskSpec, split_execution
from builder.stages.base import Stage, StageContext
from builder.stages.evaluate import run as evaluate_stage
from builder.store.stage_store import Manifest
from evaluators.base import Evaluator
from evaluators.llama_server import LlamaServerRun, LlamaServerWorkload
from evaluators.lm_eval_runner import LmEvalSettings, TaskRequest, evaluate_model
from evaluators.perplexity import PerplexitySettings, heldout_perplexity
from evaluators.registry import EVALUATORS, UnknownEvaluator, get_evaluator
from evaluators.throughput import ThroughputRun, ThroughputSettings
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint, tiny_config  # noqa: F401 (fixture)

# Settings each registered evaluator is estimated with: a new evaluator adds its own here.
EXAMPLE_SETTINGS = {
    "lm-eval": LmEvalSettings((TaskRequest("arc_easy", limit=4),)),
    "perplexity": PerplexitySettings(tokens=1024),
    "vllm-throughput": ThroughputRun(ThroughputSettings()),
    "llama-server-throughput": LlamaServerRun(LlamaServerWorkload()),
}


def _parameters(method) -> list[str]:
    return list(inspect.signature(method).parameters)


@pytest.mark.parametrize("name", sorted(EVALUATORS))
def test_every_registered_evaluator_implements_the_interface(name):
    evaluator = get_evaluator(name)  # an abstract method left out fails here, on instantiation
    assert isinstance(evaluator, Evaluator) and evaluator.name == name
    for method in ("run", "estimate"):
        assert _parameters(getattr(type(evaluator), method)) == _parameters(getattr(Evaluator, method)), method
    settings = EXAMPLE_SETTINGS[name]
    assert type(settings) is evaluator.settings_type and dataclasses.is_dataclass(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, dataclasses.fields(settings)[0].name, None)
    work = evaluator.estimate(settings, tiny_config(), COSTS, 256)
    assert isinstance(work, Work) and work.tokens > 0 and work.flops > 0


def test_every_registered_evaluator_has_example_settings():
    assert set(EXAMPLE_SETTINGS) == set(EVALUATORS)


def test_an_unknown_evaluator_is_answered_with_the_closest_names_and_the_list():
    with pytest.raises(UnknownEvaluator, match=r"^Unknown evaluator 'perplexty'\. Did you mean 'perplexity'\? "
                                               r"Available: lm-eval, perplexity, vllm-throughput, llama-server-throughput"):
        get_evaluator("perplexty")
    with pytest.raises(UnknownEvaluator) as far:
        get_evaluator("llama.cpp")
    assert "Did you mean" not in str(far.value) and "Available: lm-eval" in str(far.value)


def test_naming_and_estimating_evaluators_imports_neither_lm_eval_nor_vllm():
    """The dry run reads every stage's estimate: lm-eval and vLLM load only when an evaluator runs."""
    script = (
        "import json, sys\n"
        "from evaluators.registry import EVALUATORS, get_evaluator\n"
        "registry_alone = sorted(sys.modules)\n"
        "import builder.stages.registry\n"
        "[get_evaluator(name) for name in EVALUATORS]\n"
        "print(json.dumps([registry_alone, sorted(m for m in ('lm_eval', 'vllm') if m in sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    registry_alone, heavy = json.loads(done.stdout)
    # the registry names its evaluators' modules without importing any of them
    assert not {target.split(":")[0] for target in EVALUATORS.values()} & set(registry_alone)
    assert heavy == []


def test_the_evaluate_stage_loads_its_model_once_and_scores_as_separate_runs(tmp_path, monkeypatch):
    heldout = torch.randint(3, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    section = EvaluationSpec(tasks=[TaskSpec(name="arc_easy", limit=2)], perplexity_tokens=3 * 16, batch_size=2)
    ctx = _evaluate_context(tmp_path, section, heldout)
    model_dir = ctx.model_dir("model")
    loads = []
    real_load = builder.models.loading.load_model
    monkeypatch.setattr(builder.models.loading, "load_model",
                        lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    summary, tokens = evaluate_stage(ctx)
    assert len(loads) == 1  # lm-eval and perplexity on the same module
    assert loads[0][2] == torch.float32  # the planned training precision (float32 here)

    assert list(summary) == ["metrics", "perplexity", "placement"] and tokens == 3 * 16  # 3 whole blocks of 16
    assert (summary["placement"]["device"], summary["placement"]["dtype"]) == ("cpu", "float32")  # where it ran
    # Separate runs, each with its own fresh load (as the stage did before): the same numbers,
    # exactly, since the same float32 operations run on the same weights in the same order.
    cache_dir = tmp_path / "work" / "cache" / "lm-eval"
    alone = evaluate_model(model_dir, [TaskRequest("arc_easy", limit=2)], batch_size=2, cache_dir=cache_dir)
    assert summary["metrics"]["tasks"] == alone["tasks"] and summary["metrics"]["model"] == str(model_dir)
    assert summary["metrics"]["settings"] == alone["settings"]
    assert summary["perplexity"] == heldout_perplexity(model_dir, heldout[:3], batch_size=2, progress=False)


def test_a_bfloat16_build_evaluates_its_model_once_in_bfloat16(tmp_path, monkeypatch):
    heldout = torch.randint(3, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    section = EvaluationSpec(tasks=[TaskSpec(name="arc_easy", limit=2)], perplexity_tokens=3 * 16, batch_size=2)
    ctx = _evaluate_context(tmp_path, section, heldout, precision="bfloat16")
    loads = []
    real_load = builder.models.loading.load_model
    monkeypatch.setattr(builder.models.loading, "load_model",
                        lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    summary, _ = evaluate_stage(ctx)
    assert [args[2] for args in loads] == [torch.bfloat16]  # one load, in the planned precision
    assert summary["metrics"]["settings"]["dtype"] == "bfloat16"
    # the held-out NLL accumulates in float32 over the bf16 model's logits, as a bf16 run alone does
    alone = heldout_perplexity(ctx.model_dir("model"), heldout[:3], batch_size=2, dtype="bfloat16", progress=False)
    assert summary["perplexity"] == alone


def test_a_stage_without_tasks_keeps_its_empty_metrics(tmp_path):
    ctx = _evaluate_context(tmp_path, EvaluationSpec(perplexity_tokens=8), torch.full((2, 8), 5))
    summary, tokens = evaluate_stage(ctx)
    assert summary["metrics"] == {} and summary["perplexity"]["blocks"] == 1 and tokens == 8


def _evaluate_context(tmp_path, section: EvaluationSpec, heldout: torch.Tensor,
                      precision: str = "float32") -> StageContext:
    """An evaluate stage of a tiny checkpoint, `heldout` its token store's held-out blocks,
    planned in `precision` (as builder.planning.dag plans it)."""
    model_dir = save_tiny_checkpoint(tmp_path / "model", seed=3)
    data_dir = write_blocks(tmp_path / "data", heldout, split="heldout", vocab_size=TINY_VOCAB)
    config, execution = split_execution(section)
    key = stage_key("evaluate", "model", config, options={"precision": precision}, execution=execution)
    stage = Stage(key, {"model": "m", "data": "d"})
    inputs = {"model": Manifest("m", "", "", 0.0, summary={"model_dir": str(model_dir)}),
              "data": Manifest("d", "", "", 0.0, summary={"blocks": str(data_dir)})}
    # the evaluate stage reads its section from its key, not the family spec
    return StageContext(stage, None, RunOptions(workdir=tmp_path / "work"), tmp_path / "out", inputs)
