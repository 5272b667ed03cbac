"""The dry run's estimate (builder.planning.estimate): FLOPs checked against the architecture table's
parameter count, memory terms against their definitions, advice against the 80 GB limit,
wall time's fixed costs (start-up, checkpoints read and written, lm-eval's tokens) against
the bytes and constants they follow from."""
from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import asdict, astuple
from pathlib import Path

import pytest
import yaml

from builder import family
from builder.models.teacher import config_from_json
from builder.models.arch import count_params, student_config
from builder.cli import main
from builder.planning.cost_model import (ACCELERATORS, COSTS, GIB, LM_EVAL_LONGEST, LM_EVAL_TASKS, LONGEST_OVER_TYPICAL,
                                         UNKNOWN_TASK, config_dtype_bytes, forward_flops_per_token, forward_memory,
                                         lm_eval_longest, lm_eval_tokens, memory_of, training_disk, training_memory)
from builder.planning.estimate import estimate_plan, fit_advice, render_estimate
from builder.pruning.importance import importance_memory
from builder.teaching.teach_pass import teach_memory
from builder.options.run_options import RunOptions
from builder.spec.shape import Shape
from builder.store import disk_space
from builder.units import format_bytes

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CONFIG = ROOT / "tests" / "data" / "configs" / "Llama-3.1-8B.json"
LLAMA = config_from_json(LLAMA_CONFIG)


def test_forward_flops_are_two_per_matmul_weight_plus_attention():
    """Independent of the formula: every parameter but the embedding lookup and the norms is a
    matmul weight used once per token (2 FLOPs), plus Q K^T and scores x V over the context."""
    shape = Shape.of(LLAMA)
    norms = shape.num_hidden_layers * 2 * shape.hidden_size + shape.hidden_size
    matmul_weights = count_params(LLAMA) - LLAMA.vocab_size * shape.hidden_size - norms
    attention = 4 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * 8192
    assert forward_flops_per_token(LLAMA, 8192) == 2 * matmul_weights + attention


def test_training_memory_terms():
    student = student_config(LLAMA, Shape.of(LLAMA).replace(hidden_size=3072, intermediate_size=9216))
    params = count_params(student)
    ddp = training_memory(student, LLAMA, micro_batch=2, seq_len=1024, workers=8, parallel="ddp")
    fsdp = training_memory(student, LLAMA, micro_batch=2, seq_len=1024, workers=8, parallel="fsdp")
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * params  # fp32 master, grads, two Adam moments
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer == 16 * params / 8
    assert ddp.teacher == fsdp.teacher == 2 * count_params(LLAMA)  # frozen bf16 teacher, replicated
    double = training_memory(student, LLAMA, micro_batch=4, seq_len=1024, workers=8, parallel="ddp")
    assert double.activations == 2 * ddp.activations and double.logits == 2 * ddp.logits
    assert ddp.activations_checkpointed < ddp.activations
    correction = training_memory(LLAMA, None, micro_batch=2, seq_len=1024, workers=8, parallel="ddp")
    assert correction.teacher == 0 and correction.logits < training_memory(
        LLAMA, LLAMA, micro_batch=2, seq_len=1024, workers=8, parallel="ddp").logits


def test_activation_checkpointing_keeps_each_layers_input_and_recomputes_one_layer():
    shape = Shape.of(LLAMA)
    off = training_memory(LLAMA, None, micro_batch=1, seq_len=8192, workers=8, parallel="fsdp")
    on = training_memory(LLAMA, None, micro_batch=1, seq_len=8192, workers=8, parallel="fsdp", checkpointing=True)
    per_layer = off.activations / shape.num_hidden_layers
    # FSDP computes in bf16 parameters, so the residual stream each layer keeps is bf16
    assert on.activations_checkpointed == shape.num_hidden_layers * 2 * shape.hidden_size * 8192 + per_layer
    assert on.total == off.total - off.activations + on.activations_checkpointed == off.total_checkpointed
    assert on.total < off.total / 2


def test_parallelism_adds_ddps_buckets_or_fsdps_gathered_groups():
    ddp = training_memory(LLAMA, None, micro_batch=1, seq_len=1024, workers=8, parallel="ddp")
    fsdp = training_memory(LLAMA, None, micro_batch=1, seq_len=1024, workers=8, parallel="fsdp")
    alone = training_memory(LLAMA, None, micro_batch=1, seq_len=1024, workers=1, parallel="ddp")
    assert ddp.communication == 4 * count_params(LLAMA) and alone.communication == 0
    embeddings = 2 * LLAMA.vocab_size * Shape.of(LLAMA).hidden_size  # untied: embed_tokens and lm_head
    assert 2 * 2 * embeddings < fsdp.communication < 2 * 2 * (embeddings + count_params(LLAMA) / 8)


def test_the_teacher_is_sharded_only_under_fsdp_when_it_takes_over_a_quarter_of_a_device():
    from builder.models.teacher_sharding import REPLICATED_TEACHER_FRACTION, teacher_is_sharded

    teacher = 2 * count_params(LLAMA)  # 16 GB in bf16: 20% of an H100
    h100, l40s = ACCELERATORS["h100"].memory_gib * GIB, ACCELERATORS["l40s"].memory_gib * GIB
    assert teacher < REPLICATED_TEACHER_FRACTION * h100 and teacher > REPLICATED_TEACHER_FRACTION * l40s
    assert not teacher_is_sharded(teacher, h100, "fsdp", 8)
    assert teacher_is_sharded(teacher, l40s, "fsdp", 8) and not teacher_is_sharded(teacher, l40s, "ddp", 8)
    assert not teacher_is_sharded(teacher, l40s, "fsdp", 1)
    student = student_config(LLAMA, Shape.of(LLAMA).replace(hidden_size=3072, intermediate_size=9216))
    sharded = training_memory(student, LLAMA, 1, 1024, 8, "fsdp", device_bytes=l40s)
    replicated = training_memory(student, LLAMA, 1, 1024, 8, "fsdp", device_bytes=h100)
    assert sharded.teacher_sharded and not replicated.teacher_sharded
    assert replicated.teacher == teacher and teacher / 8 < sharded.teacher < teacher / 2


def test_float32_training_counts_float32_activations_and_logits():
    bf16 = training_memory(LLAMA, LLAMA, micro_batch=1, seq_len=1024, workers=1, parallel="ddp")
    fp32 = training_memory(LLAMA, LLAMA, micro_batch=1, seq_len=1024, workers=1, parallel="ddp", dtype="float32")
    assert fp32.teacher == 2 * bf16.teacher and fp32.logits == 12 / 8 * bf16.logits
    assert bf16.activations < fp32.activations < 2 * bf16.activations  # the fp32 residual is fp32 in both


def test_advice_names_the_change_that_fits():
    h100 = ACCELERATORS["h100"]
    options = RunOptions(train_workers=8, parallel="ddp", gpu="h100")
    # 8B trained with DDP: 16 bytes x 8B of state alone exceed 80 GB; FSDP over 8 with micro-batch 1 fits.
    advice = fit_advice(memory_of(LLAMA, None, 8192), 4, options, h100)
    assert advice.startswith("does not fit on 80 GB") and "--parallel fsdp with micro_batch_size 1" in advice
    assert advice.endswith(", or --parallel fsdp --activation-checkpointing")  # at the same micro-batch
    assert fit_advice(memory_of(LLAMA, None, 8192), 4, options.model_copy(update={
        "parallel": "fsdp", "activation_checkpointing": True}), h100).startswith("fits on 80 GB")
    assert "--parallel" not in fit_advice(memory_of(LLAMA, None, 8192), 4, RunOptions(train_workers=8,
                                          parallel="fsdp"), h100).split("try")[1]
    tiny = student_config(LLAMA, Shape.of(LLAMA).replace(num_hidden_layers=2, intermediate_size=1024))
    assert fit_advice(memory_of(tiny, None, 512), 1, options, h100).startswith("fits on 80 GB")
    # The 141 GB H200 holds what the 80 GB H100 does not (at the same settings: one GPU, no
    # DDP buckets).
    alone = RunOptions(train_workers=1, gpu="h100")
    ddp_total = memory_of(LLAMA, None, 512)(1, 1, "ddp").total
    assert 80 * 0.9 * GIB < ddp_total < 141 * 0.9 * GIB
    assert fit_advice(memory_of(LLAMA, None, 512), 1, alone, ACCELERATORS["h200"]).startswith("fits")


@pytest.fixture(scope="module")
def llama_plan(tmp_path_factory):
    options = RunOptions(workdir=tmp_path_factory.mktemp("estimate"), teacher_config=LLAMA_CONFIG, train_workers=8)
    return family.load_and_plan(ROOT / "families" / "llama-3.1-8b-minitron.yaml", options), options


def test_gpu_hours_follow_flops_peak_mfu_and_fixed_costs(llama_plan):
    plan, options = llama_plan
    estimate = estimate_plan(plan, LLAMA, options)
    (correct,) = [stage for stage in estimate.stages if stage.name == "correct"]
    section = plan.spec.correction
    steps = -(-section.tokens // (section.global_batch_size * 8192))  # whole steps, as the loop runs
    assert correct.tokens == steps * section.global_batch_size * 8192 >= 100_000_000_000 and correct.gpus == 8
    assert correct.flops == 3 * forward_flops_per_token(LLAMA, 8192) * correct.tokens
    assert correct.seconds["compute"] == pytest.approx(correct.flops / (8 * 989e12 * 0.4))
    assert correct.wall_hours * 3600 == pytest.approx(sum(correct.seconds.values()))
    assert correct.gpu_hours == pytest.approx(8 * correct.wall_hours)  # a stage holds its GPUs throughout
    slower = estimate_plan(plan, LLAMA, RunOptions(train_workers=8, mfu=0.2, gpu="a100"))
    (slow,) = [stage for stage in slower.stages if stage.name == "correct"]
    assert slow.seconds["compute"] == pytest.approx(correct.seconds["compute"] * 2 * 989 / 312)
    assert slow.seconds["write"] == correct.seconds["write"]  # the disk does not speed up with the GPU
    text = "\n".join(render_estimate(estimate))
    assert "40% MFU" in text and "GPU-hours" in text and "does not fit on 80 GB" in text
    assert "GB/s" in text and "per Ray Train worker group" in text  # the constants are printed


def _stage(estimate, name: str, label: str = ""):
    (stage,) = [s for s in estimate.stages if s.name == name and s.label == label]
    return stage


def test_checkpoint_io_is_bytes_over_bandwidth(llama_plan):
    """An 8B model: fp32 weights + AdamW's two fp32 moments per checkpoint (12 bytes a
    parameter), one every checkpoint_every steps but the last, plus the final model in the
    teacher's dtype (Llama-3.1-8B: bf16, 2 bytes a parameter)."""
    plan, options = llama_plan
    slow_disk = options.model_copy(update={"disk_gbps": 0.5})
    correct = _stage(estimate_plan(plan, LLAMA, slow_disk), "correct")
    every = plan.stages[correct.stage].key.execution["checkpoint_every"]
    steps = correct.tokens // (plan.spec.correction.global_batch_size * 8192)
    checkpoints = (steps - 1) // every
    assert correct.checkpoints == checkpoints > 0
    params = count_params(LLAMA)
    assert correct.write_bytes == (12 * checkpoints + 2) * params
    assert correct.seconds["write"] == pytest.approx((12 * checkpoints + 2) * params / 0.5e9)
    assert correct.seconds["read"] == pytest.approx(2 * params / 0.5e9)  # the acquired teacher: bf16 on disk
    assert 60 < 12 * params / 1e9 < 120  # about 96 GB a checkpoint: minutes at any file system's speed


def test_no_checkpoint_when_checkpoint_every_exceeds_the_steps(tmp_path):
    """The demo's correction: 4 steps, checkpoint_every 25: only the final model is written."""
    from builder.planning.cost_model import trained_tokens as _trained_tokens

    assert _trained_tokens({"tokens": 4000, "global_batch_size": 4}, {"checkpoint_every": 25}, 256) == (4096, 0)
    assert _trained_tokens({"tokens": 8192, "global_batch_size": 4}, {"checkpoint_every": 4}, 256) == (8192, 1)
    assert _trained_tokens({"tokens": 8193, "global_batch_size": 4}, {"checkpoint_every": 4}, 256) == (9216, 2)
    plan, config = demo_plan(tmp_path)
    correct = _stage(estimate_plan(plan, config, RunOptions()), "correct")
    # the corrected teacher, in the teacher's dtype (bf16 here)
    assert correct.checkpoints == 0 and correct.write_bytes == 2 * count_params(config)


def demo_plan(tmp_path, spec: str = "smollm2-135m.yaml", **changes):
    """The demo family planned against the Llama-shaped SmolLM2 config (no teacher needed)."""
    config = student_config(LLAMA, Shape.of(LLAMA).replace(hidden_size=576, intermediate_size=1536,
                            num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30, head_dim=64))
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    options = RunOptions(workdir=tmp_path, teacher_config=path, **changes)
    return family.load_and_plan(ROOT / "families" / spec, options), config


def test_teach_loads_the_teacher_once_per_worker_and_stored_signal_distill_none(tmp_path):
    spec = yaml.safe_load((ROOT / "families" / "smollm2-135m.yaml").read_text())
    spec["distill"] |= {"teacher_signal": "topk", "top_k": 32, "tail_samples": 16}
    (tmp_path / "topk.yaml").write_text(yaml.safe_dump(spec))
    options = dict(train_workers=4, disk_gbps=2.0)
    plan, config = demo_plan(tmp_path, str(tmp_path / "topk.yaml"), **options)
    estimate = estimate_plan(plan, config, RunOptions(**options))
    teach = _stage(estimate, "teach", "k32+16")
    teacher_bytes = 2 * count_params(config)  # the corrected teacher, written in the teacher's bf16
    assert teach.read_bytes == 4 * teacher_bytes  # one load per worker ...
    assert teach.seconds["read"] == pytest.approx(teacher_bytes / 2e9)  # ... side by side
    assert teach.gpus == 4 and teach.seconds["start"] == COSTS.train_start_s
    # Llama's 128K vocabulary: uint32 ids, fp16 log-probs, fp16 tail, uint32 draws, the token
    per_token = 32 * (4 + 2) + 2 + 16 * 4 + 4
    assert teach.write_bytes == teach.tokens * per_token
    distill = _stage(estimate, "distill", "smollm2-90m-width")
    student_bytes = 4 * count_params(student_config(config, plan.students[0].shape))
    # No teacher: the student, and each worker its quarter of the signal it trains on.
    assert distill.read_bytes == pytest.approx(4 * student_bytes + distill.tokens * per_token)
    spec["distill"] |= {"teacher_signal": "online"}
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "online").mkdir()
    online = _stage(estimate_plan(*demo_plan(tmp_path / "online", str(tmp_path / "online.yaml")),
                                  RunOptions(train_workers=4)), "distill", "smollm2-90m-width")
    assert online.read_bytes == 4 * (student_bytes + teacher_bytes)


def test_lm_eval_tokens_follow_the_task_table():
    """documents (limited per subtask) x requests x tokens per request, with few-shot examples."""
    hellaswag = LM_EVAL_TASKS["hellaswag"]
    tokens, length = lm_eval_tokens({"name": "hellaswag", "num_fewshot": 10, "limit": None})
    assert length == round(hellaswag.tokens + 10 * hellaswag.tokens_per_shot)
    assert tokens == round(hellaswag.docs * hellaswag.requests * (hellaswag.tokens + 10 * hellaswag.tokens_per_shot))
    mmlu = LM_EVAL_TASKS["mmlu"]
    limited, _ = lm_eval_tokens({"name": "mmlu", "num_fewshot": 0, "limit": 10})
    assert limited == round(57 * 10 * mmlu.requests * mmlu.tokens)  # lm-eval limits each of the 57 subjects
    assert lm_eval_tokens({"name": "no-such-task", "limit": 5})[0] == round(5 * UNKNOWN_TASK.requests *
                                                                           UNKNOWN_TASK.tokens)


def test_evaluation_counts_lm_eval_tokens_and_its_start_up(tmp_path):
    plan, config = demo_plan(tmp_path)
    evaluate = _stage(estimate_plan(plan, config, RunOptions()), "evaluate", "teacher")
    tasks = plan.stages[evaluate.stage].key.config["tasks"]
    lm_eval = sum(lm_eval_tokens(task)[0] for task in tasks)
    assert evaluate.tokens == 8000 + lm_eval and lm_eval > 0
    assert evaluate.seconds["start"] == COSTS.stage_start_s + COSTS.lm_eval_start_s + 4 * COSTS.lm_eval_task_s


def test_the_estimate_is_what_report_json_keeps(llama_plan, tmp_path):
    """family.write_family_view hands this to the report (FamilyReport.estimate)."""
    from builder.report.records import FamilyReport

    plan, options = llama_plan
    written = json.loads(json.dumps(estimate_plan(plan, LLAMA, options).to_json()))
    stages = {stage["name"] for stage in written["stages"]}
    assert {"correct", "score", "distill", "evaluate", "throughput"} <= stages
    assert written["gpu_hours"] > 1000 and written["mfu"] == 0.4
    assert FamilyReport.model_fields["estimate"].annotation is not None


def test_the_dry_run_prints_each_stages_disk_the_familys_and_what_is_free(tmp_path, monkeypatch, capsys):
    plan, config = demo_plan(tmp_path)
    estimate = estimate_plan(plan, config, RunOptions())
    distill = _stage(estimate, "distill", "smollm2-90m-width")
    student = student_config(config, plan.students[0].shape)
    assert (distill.disk_peak, distill.disk_kept) == astuple(training_disk(student, distill.checkpoints))
    teacher = _stage(estimate, "acquire-teacher")
    # the embedded GGUF, dequantized to the dtype its config declares (bf16, as the original's)
    assert teacher.disk_peak == config_dtype_bytes(config) * count_params(config) == 2 * count_params(config)
    free = 10**9
    usage = namedtuple("Usage", "total used free")(10**12, 10**12 - free, free)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: usage)
    args = [str(ROOT / "families" / "smollm2-135m.yaml"), "--dry-run", "--workdir", str(tmp_path),
            "--teacher-config", str(tmp_path / "config.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    (row,) = [line.split() for line in out.split("Disk, each stage's folder")[1].splitlines()
              if line.split()[:1] == [distill.stage]]
    assert row == [distill.stage, *format_bytes(distill.disk_peak).split(), *format_bytes(distill.disk_kept).split()]
    assert (f"  family: {format_bytes(estimate.disk_kept)} once built, at most {format_bytes(estimate.disk_peak)} "
            "at once while it builds") in out
    assert (f"Disk: the stages to run need at most {format_bytes(estimate.disk_peak)}, 1 GB is free at {tmp_path}: "
            f"free {format_bytes(estimate.disk_peak - free)} there or use a --workdir on a larger disk") in out


def test_an_evaluation_holds_one_batch_and_the_head_in_chunks():
    """Perplexity's logits are one chunk of positions, whatever the batch and sequence; lm-eval's
    are its whole batch's (and their log-softmax), in the model's dtype."""
    from evaluators.lm_eval_runner import lm_eval_memory
    from evaluators.perplexity import perplexity_memory

    small, large = (perplexity_memory(LLAMA, "bfloat16", batch, 8192) for batch in (1, 16))
    assert small.weights == large.weights == 2 * count_params(LLAMA)
    assert large.activations == 16 * small.activations
    chunk = LLAMA.hidden_size * LLAMA.vocab_size * (2 + 4 + 4)  # bf16 logits, their float32 copy and log-softmax
    assert large.logits - chunk == 16 * (small.logits - chunk)  # only the batch's hidden states and NLLs grow
    assert 16 * 8192 * LLAMA.vocab_size * (2 + 4 + 4) > 30 * chunk  # whole logits: 168 GB at batch 16
    lm_eval = lm_eval_memory(LLAMA, "bfloat16", 16, 600)
    # the batch's logits and their log-softmax, and the previous batch's log-softmax still held
    assert lm_eval.logits == 3 * 2 * 16 * 600 * LLAMA.vocab_size


def test_lm_eval_memory_is_sized_at_the_longest_request_of_the_documents_run():
    """HFLM pads its first batch to the longest request: the table's longest among the first
    documents (at least `limit` of them), not the typical length; shots add their typical tokens."""
    from evaluators.lm_eval_runner import LmEval, LmEvalSettings, TaskRequest, lm_eval_memory

    table = LM_EVAL_LONGEST["hellaswag"]
    hellaswag = {"name": "hellaswag", "num_fewshot": 0}
    assert lm_eval_longest(hellaswag | {"limit": table[0][0]}) == table[0][1]
    assert lm_eval_longest(hellaswag | {"limit": table[0][0] + 1}) == table[1][1]
    assert lm_eval_longest(hellaswag | {"limit": None}) == lm_eval_longest(hellaswag | {"limit": 10**9}) == table[-1][1]
    assert table[-1][1] > 2 * LM_EVAL_TASKS["hellaswag"].tokens  # the whole split's longest: far from typical
    assert lm_eval_longest(hellaswag | {"num_fewshot": 2, "limit": None}) == round(
        table[-1][1] + 2 * LM_EVAL_TASKS["hellaswag"].tokens_per_shot)
    assert lm_eval_longest({"name": "no-such-task"}) == round(LONGEST_OVER_TYPICAL * UNKNOWN_TASK.tokens)
    settings = LmEvalSettings((TaskRequest("winogrande", limit=20), TaskRequest("hellaswag", limit=20)), batch_size=16)
    longest = max(lm_eval_longest({"name": name, "limit": 20}) for name in ("winogrande", "hellaswag"))
    memory = LmEval().estimate(settings, LLAMA, COSTS, 2048).forward_memory_of("bfloat16")
    assert memory == lm_eval_memory(LLAMA, "bfloat16", 16, longest)


def test_the_estimate_sizes_every_pass_without_gradients(tmp_path):
    options = RunOptions(workdir=tmp_path, teacher_config=LLAMA_CONFIG)
    plan = family.load_and_plan(ROOT / "families" / "llama-3.1-8b-minitron.yaml", options)
    estimate = estimate_plan(plan, LLAMA, options)
    evaluations = [stage for stage in estimate.stages if stage.name == "evaluate"]
    assert evaluations and all(stage.memory["forward"]["fits"] for stage in evaluations)
    sized = {"evaluate", "score", "teach"}
    assert all("forward" not in stage.memory for stage in estimate.stages if stage.name not in sized)
    # score: float32 whatever the plan's precision (its stage loads the model so), the spec's batch of 8
    assert _stage(estimate, "score").memory["forward"] == asdict(importance_memory(LLAMA, 8, 8192)) | {
        "total": importance_memory(LLAMA, 8, 8192).total, "fits": True}
    assert _stage(estimate, "score").memory["forward"]["weights"] == 4 * count_params(LLAMA)


def test_teach_is_sized_in_the_precision_its_gpus_run(tmp_path):
    """The plan's precision on GPUs (what the teach stage's key hashes), bf16 for a plan made for a CPU."""
    spec = yaml.safe_load((ROOT / "families" / "smollm2-135m.yaml").read_text())
    spec["distill"] |= {"teacher_signal": "topk", "top_k": 32, "tail_samples": 16}
    (tmp_path / "topk.yaml").write_text(yaml.safe_dump(spec))
    weights = {}
    for name, changes in {"cpu": {}, "gpu-fp32": {"gpus_per_stage": 1, "precision": "float32"}}.items():
        (tmp_path / name).mkdir()
        plan, config = demo_plan(tmp_path / name, str(tmp_path / "topk.yaml"), **changes)
        forward = _stage(estimate_plan(plan, config, RunOptions(**changes)), "teach", "k32+16").memory["forward"]
        expected = teach_memory(config, "float32" if changes else "bfloat16", spec["scoring"]["batch_size"],
                                spec["data"]["seq_len"], 32, 16)
        assert forward["total"] == expected.total
        weights[name] = forward["weights"]
    assert weights["gpu-fp32"] == 2 * weights["cpu"] == 4 * count_params(config)


def test_score_holds_its_hooks_copies_and_statistics_or_its_lm_loss_pass():
    shape = Shape.of(LLAMA)
    stats = 4 * shape.num_hidden_layers * (shape.intermediate_size + shape.num_attention_heads * shape.head_dim
                                           + 2 * shape.hidden_size)  # one fp32 running sum per unit (l2)
    small, large = (importance_memory(LLAMA, batch, 4096) for batch in (1, 8))
    hooks = 4 * 4096 * shape.intermediate_size  # one fp32 copy of down_proj's input: the widest hooked activation
    assert small == forward_memory(LLAMA, "float32", 4096, 0.0, held=hooks + stats)
    assert large.activations == 8 * small.activations and large.held - stats == 8 * hooks and large.logits == 0
    var = importance_memory(LLAMA, 1, 4096, sequence_aggregation="var", batch_aggregation="var")
    assert var.held == 2 * hooks + 4 * stats  # x - mean and its square; float64 totals and squares
    with_loss = importance_memory(LLAMA, 8, 4096, lm_loss_batch=8)
    logits = 4 * 8 * 4096 * LLAMA.vocab_size  # the LM loss pass's float32 logits, and its log_softmax after the forward
    assert with_loss == forward_memory(LLAMA, "float32", 8 * 4096, logits, after=logits)
    assert importance_memory(LLAMA, 8, 4096, lm_loss_batch=1) == large  # the larger pass counts


def test_teach_holds_the_batchs_logits_then_topk_chunks_and_outputs():
    from builder.teaching.target import LOSS_CHUNK_TOKENS

    vocab, tokens = LLAMA.vocab_size, 8 * 4096
    bf16 = teach_memory(LLAMA, "bfloat16", 8, 4096, 256, 16)
    outputs = 2 * tokens * (256 * (8 + 4) + 4 + 16 * 8)  # int64 ids, fp32 values and tail, int64 draws; and torch.cat's
    # the chunk's fp32 log-softmax and its float64 cumulative sum (the fp32 copy of the bf16 logits freed by then)
    assert bf16 == forward_memory(LLAMA, "bfloat16", tokens, 2 * tokens * vocab,
                                  after=LOSS_CHUNK_TOKENS * vocab * (4 + 8) + outputs)
    no_tail = teach_memory(LLAMA, "bfloat16", 8, 4096, 256, 0)
    assert no_tail.after == LOSS_CHUNK_TOKENS * vocab * (4 + 4) + 2 * tokens * (256 * 12 + 4)  # the copy and log_softmax
    fp32 = teach_memory(LLAMA, "float32", 8, 4096, 256, 0)
    assert fp32.after == LOSS_CHUNK_TOKENS * vocab * 4 + 2 * tokens * (256 * 12 + 4)  # fp32 at temperature 1: no copy
    one = teach_memory(LLAMA, "bfloat16", 1, 4096, 256, 16)
    assert bf16.activations == 8 * one.activations and bf16.logits == 8 * one.logits
    assert bf16.total == bf16.weights + bf16.logits + max(bf16.activations, bf16.after)


def test_the_longest_request_table_is_the_benchmarks_result():
    """cost_model.LM_EVAL_LONGEST is what `bench.estimate --longest` measured, nothing typed by hand."""
    measured = json.loads((ROOT / "bench" / "results" / "estimate_longest.json").read_text())["tasks"]
    assert LM_EVAL_LONGEST == {name: tuple(tuple(pair) for pair in task["longest"]) for name, task in measured.items()}


def test_the_task_costs_are_the_benchmarks_result():
    """cost_model.LM_EVAL_TASKS' measured entries are what `bench.estimate --tasks` measured:
    tokens at zero shots, and each shot's tokens from the few-shot run (to the table's 0.1 token)."""
    measured = json.loads((ROOT / "bench" / "results" / "estimate_tasks.json").read_text())["tasks"]
    for key, found in measured.items():
        name, shots = key.split(":")
        cost = LM_EVAL_TASKS[name]
        assert (cost.docs, cost.requests) == (found["docs"], found["requests"]), key
        if shots == "0":
            assert cost.tokens == found["tokens"], key
        else:
            assert cost.tokens_per_shot == pytest.approx((found["tokens"] - cost.tokens) / int(shots), abs=0.05), key
