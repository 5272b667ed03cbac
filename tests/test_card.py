"""Model cards: a golden file pins the rendering; the front matter parses as the Hub reads it.

    .venv/bin/python -m pytest tests/test_card.py -q
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_card.py -q   # after an intended change
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from publish.card import CardInputError, card_inputs_from_report, render_card_from_report

GOLDEN = Path(__file__).parent / "golden" / "card.md"

SPEC_YAML = """\
family: smollm2-135m-sotu
teacher:
  source: embedded:smollm2-135m-instruct
  repo_id: HuggingFaceTB/SmolLM2-135M-Instruct
  license: apache-2.0
data:
  source: embedded:sotu
correction:
  tokens: 20K
distill:
  tokens: 40K
students:
  - name: smollm2-90m-depth
    shape:
      num_hidden_layers: 17
    why: >
      Depth pruning to about the width student's size: drop the 13 layers
      with the lowest block importance.
evaluation:
  tasks:
    - {name: hellaswag, limit: 50}
    - {name: piqa, limit: 50}
publish:
  org: my-org
  license: mit
"""


def sample_report() -> dict:
    """A report.json as builder/report.py writes it, with teacher correction on."""
    shape = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
             "num_key_value_heads": 3, "head_dim": 64}
    correct = {"tokens": 20000, "wall_s": 60.1, "flops": 1.6e13, "path": "/runs/x/correct"}
    teacher = {
        "name": "teacher", "path": "/runs/x/correct/model", "source": "embedded:smollm2-135m-instruct",
        "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0", "params": 134515008,
        "shape": {**shape, "num_hidden_layers": 30}, "corrected": True, "evaluation_error": None,
        "metrics": {  # the corrected teacher
            "hellaswag": {"acc": 0.34, "acc_stderr": 0.0677, "acc_norm": 0.4, "acc_norm_stderr": 0.07,
                          "num_fewshot": 0, "limit": 50, "source": "bundled", "version": 1.0},
            "piqa": {"acc": 0.64, "acc_stderr": 0.0686, "num_fewshot": 0, "limit": 50, "source": "bundled",
                     "version": 1.0},
            "perplexity": 18.2,
        },
        "throughput": {"output_tokens_per_s": 533.3, "ratio_to_teacher": 1.0, "hardware": "2x CPU"},
        "stages": {"acquire-teacher": {"tokens": 0, "wall_s": 3.5, "flops": 0, "path": "/runs/x/acquire"},
                   "correct": correct,
                   "score": {"tokens": 16384, "wall_s": 20.0, "flops": 4.4e12, "path": "/runs/x/score"}},
    }
    original = {
        "name": "teacher-original", "path": "/runs/x/acquire/model", "evaluation_error": None, "throughput": None,
        "metrics": {
            "hellaswag": {"acc": 0.36, "acc_stderr": 0.0686, "acc_norm": 0.42, "acc_norm_stderr": 0.07,
                          "num_fewshot": 0, "limit": 50, "source": "bundled", "version": 1.0},
            "piqa": {"acc": 0.66, "acc_stderr": 0.0677, "num_fewshot": 0, "limit": 50, "source": "bundled",
                     "version": 1.0},
            "perplexity": 21.4,
        },
    }
    student = {
        "name": "smollm2-90m-depth", "path": "/runs/x/distill/model", "params": 88500000,
        "shape": {**shape, "num_hidden_layers": 17},
        "repo_id": "my-org/smollm2-90m-depth",
        "why": "Depth pruning to about the width student's size: drop the 13 layers\nwith the lowest block importance.\n",
        "evaluation_error": None,
        "lineage": {
            "correction": correct,
            "pruning": {"axes": {"num_hidden_layers": [30, 17]}, "depth_method": "block_importance",
                        "layers_kept": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 26, 28, 29],
                        "calibration_samples": 64},
            "distillation": {"tokens": 40000, "steps": 40, "loss": "forward_kl", "final_loss": 1.2345,
                             "temperature": 1.0, "loss_curve": "/runs/x/distill/metrics.jsonl"},
        },
        "metrics": {
            "hellaswag": {"acc": 0.28, "acc_stderr": 0.0641, "acc_norm": 0.3, "acc_norm_stderr": 0.0655,
                          "num_fewshot": 0, "limit": 50, "source": "bundled", "version": 1.0},
            "piqa": {"acc": 0.62, "acc_stderr": "N/A", "num_fewshot": 0, "limit": 50, "source": "bundled",
                     "version": 1.0},
            "perplexity": 23.1,
        },
        "throughput": {"output_tokens_per_s": 800.0, "ratio_to_teacher": 1.5, "hardware": "2x CPU",
                       "engine_args": {"enforce_eager": True, "max_model_len": 512}},
        "stages": {
            "prune": {"tokens": 0, "wall_s": 1.2, "flops": 0, "path": "/runs/x/prune"},
            "distill": {"tokens": 40000, "wall_s": 300.0, "flops": 1.2e14, "path": "/runs/x/distill"},
            "evaluate": {"tokens": 51000, "wall_s": 95.5, "flops": 9.0e12, "path": "/runs/x/evaluate"},
        },
        "card": "/runs/x/students/smollm2-90m-depth/README.md",
    }
    return {"family": "smollm2-135m-sotu", "description": "Two students.", "teacher": teacher,
            "teacher_original": original, "students": [student], "hardware": "2 CPU cores (x86_64), no GPU",
            "spec_yaml": SPEC_YAML, "failures": {}, "complete": True}


def render(report: dict | None = None) -> str:
    return render_card_from_report(report or sample_report(), "smollm2-90m-depth")


def test_card_matches_golden_file():
    text = render()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "card changed; if intended, rerun with UPDATE_GOLDEN=1 and review the diff"


def test_front_matter_parses_as_the_hub_reads_it():
    card = ModelCard(render())
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "mit"  # the spec's publish.license wins over the teacher's
    assert {"minitron", "pruned", "distilled", "minizoo"} <= set(data.tags)
    assert data.model_name == "my-org/smollm2-90m-depth"
    scores = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores == {("Rowan/hellaswag", "acc"): 0.28, ("Rowan/hellaswag", "acc_norm"): 0.3,
                      ("ybisk/piqa", "acc"): 0.62}


def test_license_defaults_to_the_teachers():
    report = sample_report()
    report["spec_yaml"] = SPEC_YAML.replace("  license: mit\n", "")
    assert ModelCard(render(report)).data.license == "apache-2.0"


def test_body_tells_lineage_deltas_and_embeds_the_exact_spec():
    text = render()
    assert "`num_hidden_layers`: 30 -> 17" in text
    # Δ against the published teacher (0.360), not the corrected one (0.340) that readers cannot download
    assert "| hellaswag | acc | 0-shot, first 50 examples | 0.360 | 0.340 | 0.280 ± 0.064 | -0.080 (-22.2%) |" in text
    assert "| speed-up | 1.00× | 1.50× |" in text
    assert 'AutoModelForCausalLM.from_pretrained("my-org/smollm2-90m-depth")' in text
    assert 'LLM(model="my-org/smollm2-90m-depth")' in text
    assert SPEC_YAML.rstrip("\n") in text
    assert "within two standard errors of chance (0.25)" in text  # hellaswag 0.28 ± 0.064 vs 0.25


def test_without_correction_the_table_has_one_teacher():
    report = sample_report()
    report.pop("teacher_original")
    report["students"][0]["lineage"]["correction"] = None
    text = render(report)
    assert "| hellaswag | acc | 0-shot, first 50 examples | 0.340 | 0.280 ± 0.064 | -0.060 (-17.6%) |" in text
    assert "Corrected teacher" not in text and "The teacher was not corrected" in text


def test_failures_are_stated_not_hidden():
    report = sample_report()
    student = report["students"][0]
    student["throughput"] = {"error": "vLLM is not installed"}
    student["metrics"]["piqa"] = {"error": "task crashed | badly"}
    student["evaluation_error"] = "Traceback (most recent call last):\n ...\nRuntimeError: out of memory\n"
    text = render(report)
    assert "Not measured: vLLM is not installed." in text
    assert "failed: task crashed \\| badly" in text
    assert "**Evaluation failed:** RuntimeError: out of memory" in text
    assert [r.dataset_type for r in ModelCard(text).data.eval_results] == ["Rowan/hellaswag"] * 2


def test_card_of_an_unfinished_student_says_what_is_missing():
    report = sample_report()
    student = report["students"][0]
    student.update(metrics={}, throughput=None, stages={"prune": None, "distill": None, "evaluate": None})
    student["lineage"]["distillation"] = {"tokens": None, "steps": None, "loss": "forward_kl", "final_loss": None}
    report["teacher"]["repo_id"] = None  # a teacher known only by its source
    text = render(report)
    assert "The student has no evaluation results." in text and "| hellaswag" not in text
    assert "The student has not been evaluated, so its quality is unknown." in text
    assert "**Distillation:** not run" in text
    assert "student of `embedded:smollm2-135m-instruct`" in text
    assert ModelCard(text).data.base_model is None and ModelCard(text).data.eval_results is None


def test_spec_with_backticks_keeps_its_fence():
    report = sample_report()
    report["spec_yaml"] = SPEC_YAML + "# a comment with ``` inside\n"
    text = render(report)
    assert "````yaml\n" in text and text.rstrip().endswith("````")


def test_missing_report_field_names_the_key():
    report = copy.deepcopy(sample_report())
    del report["students"][0]["params"]
    with pytest.raises(CardInputError, match="'params'"):
        render(report)
    with pytest.raises(CardInputError, match="no student 'nope'"):
        card_inputs_from_report(sample_report(), "nope")
