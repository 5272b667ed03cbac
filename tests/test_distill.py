"""Distillation and teacher correction on tiny CPU models: losses, loop, determinism, resume.

Run: .venv/bin/pytest tests/test_distill.py -q
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

import builder.training.step as step_module
from builder.models.loading import load_model
from builder.training.loop import correct_teacher, distill
from builder.training.settings import TrainSettings, TrainingDiverged
from builder.training.aligner import HiddenStateAligner, _teacher_layer_indices
from builder.training.losses import chunked_losses
from builder.training.step import accumulate_gradients, forward_loss
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint  # noqa: F401 (autouse fixture)

SEQ_LEN = 32
FAST = dict(learning_rate=3e-3, warmup_steps=2, min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    teacher = save_tiny_checkpoint(root / "teacher", seed=0)
    student = save_tiny_checkpoint(root / "student", seed=1, num_hidden_layers=2)
    return teacher, student


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (48, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def steps_settings(steps: int, **overrides) -> TrainSettings:
    """Settings whose token budget is exactly `steps` steps in one process."""
    batch, accum = overrides.pop("batch_size", 4), overrides.get("grad_accum", 1)
    return TrainSettings(tokens=steps * batch * accum * SEQ_LEN, batch_size=batch, **{**FAST, **overrides})


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "model" / "model.safetensors"))


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------
# Losses against a naive reference


def naive_losses(student, teacher, labels, kind, temperature):
    p = F.softmax(student / temperature, -1)
    q = F.softmax(teacher / temperature, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    m = (p + q) / 2
    per_token = {"forward_kl": kl(q, p), "reverse_kl": kl(p, q), "jsd": 0.5 * kl(p, m) + 0.5 * kl(q, m)}
    ce = F.cross_entropy(student, labels, ignore_index=-100)
    return per_token[kind].mean() * temperature**2, ce


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_losses_match_naive_reference_in_value_and_gradient(kind, temperature):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(10, 50, generator=generator, dtype=torch.float64).mul(3).requires_grad_()
    teacher = torch.randn(10, 50, generator=generator, dtype=torch.float64).mul(3)
    labels = torch.randint(0, 50, (10,), generator=generator)
    labels[-1] = -100
    # chunk_tokens=3 splits 10 tokens unevenly, so chunking and recomputation are exercised.
    div, ce = chunked_losses(student, teacher, labels, kind, temperature, with_ce=True, chunk_tokens=3)
    ref_div, ref_ce = naive_losses(student.float(), teacher.float(), labels, kind, temperature)
    torch.testing.assert_close(div, ref_div, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)

    (grad,) = torch.autograd.grad(div + ce, student)
    ref_student = student.detach().float().requires_grad_()
    ref_total = sum(naive_losses(ref_student, teacher.float(), labels, kind, temperature))
    (ref_grad,) = torch.autograd.grad(ref_total, ref_student)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_is_zero_when_student_equals_teacher(kind):
    logits = torch.randn(7, 40) * 4
    div, _ = chunked_losses(logits.clone().requires_grad_(), logits, torch.zeros(7, dtype=torch.long), kind)
    assert abs(div.item()) < 1e-6
    other, _ = chunked_losses(logits.flip(0), logits, torch.zeros(7, dtype=torch.long), kind)
    assert other.item() > 1e-2


def test_jsd_is_bounded_by_log_two():
    student = torch.tensor([[50.0, -50.0]])
    teacher = torch.tensor([[-50.0, 50.0]])
    div, _ = chunked_losses(student, teacher, torch.tensor([0]), "jsd")
    assert div.item() == pytest.approx(math.log(2), rel=1e-4)


def test_gradients_reach_every_student_weight_but_never_the_teacher(models, blocks):
    teacher_dir, student_dir = models
    teacher = load_model(teacher_dir, torch.device("cpu"), torch.float32, trainable=False)
    student = load_model(student_dir, torch.device("cpu"), torch.float32, trainable=True)
    settings = steps_settings(1, lm_loss_weight=0.5)
    loss, divergence, ce, hidden = forward_loss(student, teacher, blocks[:2], settings, torch.device("cpu"))
    assert math.isnan(hidden.item())  # no hidden-state loss unless asked
    loss.backward()
    assert loss.item() == pytest.approx(divergence.item() + 0.5 * ce.item(), rel=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------------------
# Settings


def test_settings_errors_name_the_field_value_and_fix():
    with pytest.raises(ValueError) as error:
        TrainSettings(tokens=0, loss="kl", warmup_steps=1.5)
    message = str(error.value)
    assert "tokens=0 must be positive" in message
    assert "loss='kl' must be one of forward_kl, reverse_kl, jsd, cross_entropy" in message
    assert "warmup_steps=1.5" in message


def test_step_count_follows_the_token_budget():
    settings = TrainSettings(tokens=1000, batch_size=2, grad_accum=3)
    assert settings.steps(seq_len=16, world_size=2) == math.ceil(1000 / (2 * 3 * 16 * 2))
    assert TrainSettings(tokens=100, warmup_steps=0.25).warmup(total_steps=40) == 10


def test_settings_come_from_the_spec_plus_run_options():
    from builder.spec.schema import CorrectionSpec, DistillSpec

    settings = TrainSettings.from_spec(DistillSpec(tokens="2M", loss="jsd"), dtype="bfloat16")
    assert (settings.tokens, settings.loss, settings.dtype) == (2_000_000, "jsd", "bfloat16")
    correction = TrainSettings.from_spec(CorrectionSpec(tokens="1M"))
    assert correction.learning_rate == CorrectionSpec(tokens="1M").learning_rate


def test_a_spec_field_the_loop_does_not_know_is_refused_by_name():
    from builder.spec.schema import DistillSpec

    class SmoothedDistillSpec(DistillSpec):  # a new spec field, with no way into the loop yet
        label_smoothing: float = 0.1

    with pytest.raises(ValueError, match=r"SmoothedDistillSpec label_smoothing=0\.1 would not reach the "
                                         r"training loop.*add it to PLANNING_ONLY"):
        TrainSettings.from_spec(SmoothedDistillSpec(tokens="1M"))


def test_planning_only_names_spec_fields_the_loop_does_not_have():
    from builder.spec.schema import CorrectionSpec, DistillSpec
    from builder.training.settings import PLANNING_ONLY

    spec_fields = DistillSpec.model_fields.keys() | CorrectionSpec.model_fields.keys()
    loop_fields = {field.name for field in dataclasses.fields(TrainSettings)}
    assert PLANNING_ONLY.keys() <= spec_fields and not PLANNING_ONLY.keys() & loop_fields


def test_settings_defaults_are_the_specs():
    """TrainSettings built directly (benches, tests) trains as an unset spec field would."""
    from builder.spec.schema import DistillSpec

    defaulted = [f for f in dataclasses.fields(TrainSettings) if f.default is not dataclasses.MISSING]
    shared = [f for f in defaulted if f.name in DistillSpec.model_fields]
    assert shared and all(f.default == DistillSpec.model_fields[f.name].default for f in shared)


def test_cross_entropy_distillation_is_refused(models, blocks, tmp_path):
    with pytest.raises(ValueError, match="correct_teacher"):
        distill(*models, blocks, tmp_path, steps_settings(1, loss="cross_entropy"))


def test_token_ids_outside_the_vocab_are_refused(models, tmp_path):
    bad = torch.full((4, SEQ_LEN), TINY_VOCAB)
    with pytest.raises(ValueError, match="vocab_size is 384"):
        distill(*models, bad, tmp_path, steps_settings(1))


# ----------------------------------------------------------------------------------------
# The loop


def held_out_kl(teacher_dir: Path, student_dir: Path, blocks: torch.Tensor) -> float:
    cpu = torch.device("cpu")
    teacher = load_model(teacher_dir, cpu, torch.float32, trainable=False)
    student = load_model(student_dir, cpu, torch.float32, trainable=False)
    with torch.no_grad():
        return forward_loss(student, teacher, blocks, steps_settings(1), cpu)[1].item()


def test_distillation_lowers_the_kl_and_writes_a_loadable_checkpoint(models, blocks, tmp_path):
    teacher_dir, student_dir = models
    result = distill(teacher_dir, student_dir, blocks[:40], tmp_path, steps_settings(30, checkpoint_every=10))

    before = held_out_kl(teacher_dir, student_dir, blocks[40:])
    after = held_out_kl(teacher_dir, tmp_path / "model", blocks[40:])
    assert after < 0.7 * before
    assert result.steps == 30 and result.tokens_seen == 30 * 4 * SEQ_LEN and result.start_step == 0
    assert result.tokens_per_second > 0 and math.isfinite(result.final_loss)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "model").iterdir()
    }
    lines = metrics(tmp_path)
    assert [line["step"] for line in lines] == list(range(1, 31))
    assert {"loss", "kl", "lr", "tokens_per_s", "grad_norm"} <= set(lines[0])
    assert lines[1]["lr"] == pytest.approx(3e-3)  # warm-up over 2 steps, then cosine decay
    assert lines[-1]["lr"] < lines[10]["lr"] < lines[1]["lr"]
    assert json.loads((tmp_path / "result.json").read_text())["final_loss"] == result.final_loss


def test_same_seed_gives_identical_weights_and_another_seed_does_not(models, blocks, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        distill(*models, blocks, tmp_path / name, steps_settings(4, seed=seed))
    a, b, c = (weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)  # the seed orders the data


def test_a_checkpoint_from_a_different_plan_is_not_resumed(models, blocks, tmp_path):
    distill(*models, blocks, tmp_path, steps_settings(3, checkpoint_every=2))
    with pytest.raises(ValueError, match="step-000002.*use a new out_dir"):
        distill(*models, blocks, tmp_path, steps_settings(3, checkpoint_every=2, seed=7))


def test_gradient_accumulation_matches_one_large_batch(models, blocks, tmp_path):
    """Two micro-batches of 2 give the gradient of one batch of 4, and the same training run.

    Tolerances follow from the operations, not from one CPU's rounding:
    - gradients: the same float32 terms summed in another order (per micro-batch, then
      across them) differ by a few ulps of the largest term; AVX2 and AVX-512 kernels also
      order sums differently. 1e-5 of each tensor's largest gradient is ~100 ulps of headroom.
    - weights are NOT compared element-wise after training: AdamW divides each gradient by
      its own running RMS, so an element whose gradient is at the rounding level can take a
      visibly different step. The
      per-step losses, which average over every weight, must agree to float32 precision.
    """
    grads = gradients_by_layout(models, blocks, "float32")
    for key, big in grads["big"].items():
        torch.testing.assert_close(grads["accum"][key], big, rtol=1e-5, atol=1e-5 * float(big.abs().max()))

    # max_grad_norm=0 also runs the unclipped path.
    distill(*models, blocks, tmp_path / "big", steps_settings(3, batch_size=4, max_grad_norm=0))
    distill(*models, blocks, tmp_path / "accum", steps_settings(3, batch_size=2, grad_accum=2, max_grad_norm=0))
    big_losses = [m["loss"] for m in metrics(tmp_path / "big")]
    assert [m["loss"] for m in metrics(tmp_path / "accum")] == pytest.approx(big_losses, rel=1e-5)


def gradients_by_layout(models, blocks: torch.Tensor, dtype: str) -> dict[str, dict[str, torch.Tensor]]:
    """One step's gradients in two layouts of the same 4 sequences: one micro-batch of 4
    ("big") and two of 2 ("accum"), as 1 and 2 workers (or micro_batch_size 4 and 2) take them."""
    teacher_dir, student_dir = models
    teacher = load_model(teacher_dir, torch.device("cpu"), getattr(torch, dtype), trainable=False)
    grads = {}
    for name, settings in {"big": steps_settings(1, batch_size=4, dtype=dtype),
                           "accum": steps_settings(1, batch_size=2, grad_accum=2, dtype=dtype)}.items():
        student = load_model(student_dir, torch.device("cpu"), torch.float32, trainable=True)
        batches = SimpleNamespace(micro_batch=lambda step, micro, s=settings: blocks[micro * s.batch_size:
                                                                                    (micro + 1) * s.batch_size])
        accumulate_gradients(student, teacher, batches, 1, settings, torch.device("cpu"))
        grads[name] = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert grads["big"].keys() == grads["accum"].keys() and grads["big"]
    return grads


def test_in_bfloat16_another_batch_layout_changes_the_gradients_at_bfloat16s_rounding(models, blocks):
    """Why a training stage's result is defined only up to the order of its float sums
    (builder.training.layouts), and the report says which layout made the weights: under
    bfloat16 autocast each weight gradient is a bf16 matmul over the micro-batch's rows,
    rounded to bfloat16 (8 significant bits, unit roundoff u = 2^-8) once for one micro-batch
    of 4 and once per micro-batch of 2. The two layouts then differ far beyond float32's
    rounding (the test above: 1e-5 of each tensor's largest gradient), by about u of the
    gradient's scale; 4u leaves room for partial sums larger than their total."""
    grads = gradients_by_layout(models, blocks, "bfloat16")
    worst = max(float((grads["accum"][key] - big).abs().max() / big.abs().max()) for key, big in grads["big"].items())
    assert 1e-5 < worst <= 4 * 2.0**-8


def test_the_layouts_that_made_the_weights_are_recorded_across_a_resume_on_another(models, blocks, tmp_path,
                                                                                  monkeypatch):
    """A run killed after its step-2 checkpoint and resumed with micro-batches of 2 instead of
    4 (as on 2 workers instead of 1): the result says which layout took which steps."""
    break_the_loss_at_call(monkeypatch, 3, float("nan"))
    with pytest.raises(TrainingDiverged):
        distill(*models, blocks, tmp_path, steps_settings(4, checkpoint_every=2))
    monkeypatch.undo()  # the real loss again
    result = distill(*models, blocks, tmp_path, steps_settings(4, batch_size=2, grad_accum=2, checkpoint_every=2))
    one = {"workers": 1, "parallel": "ddp", "dtype": "float32"}
    assert result.layouts == [{"first_step": 1, "last_step": 2, "micro_batch_size": 4, "grad_accum": 1, **one},
                              {"first_step": 3, "last_step": 4, "micro_batch_size": 2, "grad_accum": 2, **one}]
    assert json.loads((tmp_path / "result.json").read_text())["layouts"] == result.layouts  # the stage's summary


def test_bf16_autocast_and_activation_checkpointing_train_the_same_model(models, blocks, tmp_path):
    distill(*models, blocks, tmp_path / "plain", steps_settings(2))
    distill(*models, blocks, tmp_path / "ckpt", steps_settings(2, activation_checkpointing=True))
    distill(*models, blocks, tmp_path / "bf16", steps_settings(2, dtype="bfloat16"))
    plain, ckpt = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    assert [m["loss"] for m in ckpt] == pytest.approx([m["loss"] for m in plain], rel=1e-5)
    bf16 = metrics(tmp_path / "bf16")
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in plain], rel=0.1)


def test_teacher_correction_lowers_the_lm_loss(models, tmp_path):
    teacher_dir, _ = models
    repeated = torch.arange(3, 3 + SEQ_LEN).repeat(16, 1)  # a pattern that is easy to learn
    result = correct_teacher(teacher_dir, repeated, tmp_path, steps_settings(15, learning_rate=1e-2))
    lines = metrics(tmp_path)
    assert "kl" not in lines[0] and lines[0]["ce"] == lines[0]["loss"]
    assert result.final_loss < 0.5 * lines[0]["loss"]
    assert (tmp_path / "model" / "tokenizer.json").exists()


def break_the_loss_at_call(monkeypatch, call: int, factor: float) -> None:
    """forward_loss's `call`-th call (one per micro-batch) returns its losses times `factor`."""
    real_forward_loss, calls = step_module.forward_loss, []

    def broken(*args):
        calls.append(1)
        parts = real_forward_loss(*args)
        return parts * factor if len(calls) == call else parts

    monkeypatch.setattr(step_module, "forward_loss", broken)


def test_a_non_finite_loss_stops_training_and_names_the_step(models, blocks, tmp_path, monkeypatch):
    break_the_loss_at_call(monkeypatch, 3, float("inf"))
    with pytest.raises(TrainingDiverged, match="step 3") as error:
        distill(*models, blocks, tmp_path, steps_settings(5, checkpoint_every=2))
    assert error.value.step == 3
    assert "the checkpoint of step 2" in str(error.value)  # promised only because it exists
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000002"
    assert not (tmp_path / "model").exists() and not (tmp_path / "result.json").exists()


def test_a_non_finite_loss_at_the_first_step_points_at_the_inputs_not_the_learning_rate(models, blocks, tmp_path,
                                                                                      monkeypatch):
    """Before the first update the learning rate has done nothing yet: a NaN there comes from
    what was loaded (a damaged checkpoint or token file) or from overflow, and says so."""
    break_the_loss_at_call(monkeypatch, 1, float("nan"))
    with pytest.raises(TrainingDiverged) as error:
        distill(*models, blocks, tmp_path, steps_settings(3))
    message = str(error.value)
    assert error.value.step == 1 and "an input may be damaged" in message
    assert "build-family verify SPEC" in message and "--precision float32" in message
    assert "lower distill.learning_rate" not in message


def test_an_exploding_loss_stops_training_naming_the_spec_fields(models, blocks, tmp_path):
    """lr 0.99 (the spec allows it) sent the loss up 190x and training went on to print a
    132-digit perplexity; now it stops like a NaN, with fixes a spec can express."""
    with pytest.raises(TrainingDiverged) as error:
        distill(*models, blocks, tmp_path, steps_settings(24, learning_rate=0.99, warmup_steps=0,
                                                          checkpoint_every=100))
    message = str(error.value)
    before = metrics(tmp_path)[:step_module.LOSS_BASELINE_STEPS]  # the steps that set the bar
    assert len(before) == min(error.value.step - 1, step_module.LOSS_BASELINE_STEPS)
    start = sum(line["loss"] for line in before) / len(before)
    assert error.value.value > step_module.EXPLODED_LOSS_FACTOR * start
    assert "distill.learning_rate (now 0.99)" in message and "--precision float32" in message
    assert "max_grad_norm" not in message  # not a spec field
    assert "checkpoint" not in message  # none was saved before it diverged
    assert not (tmp_path / "model").exists() and not (tmp_path / "result.json").exists()


def test_a_healthy_run_is_never_taken_for_an_explosion(models, blocks, tmp_path):
    result = distill(*models, blocks, tmp_path, steps_settings(12))
    assert result.steps == 12


@contextlib.contextmanager
def process_group_of_one(tmp_path: Path) -> Iterator[None]:
    """A gloo process group holding only this process: DDP and FSDP2 wrap the model for real."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_wrapped_training_and_its_checkpoints_match_one_process(models, blocks, tmp_path, parallel):
    # Two ranks are checked against one process in test_ray_train.py (DDP); FSDP on two
    # ranks was checked by hand (weights within 1e-6).
    settings = steps_settings(4, checkpoint_every=2)
    plain = distill(*models, blocks, tmp_path / "plain", settings)
    with process_group_of_one(tmp_path):
        wrapped = distill(*models, blocks, tmp_path / "wrapped", settings, parallel=parallel)
        # Run it again from its step-2 checkpoint: FSDP gathers the shards to save and
        # re-shards them to load.
        (tmp_path / "wrapped" / "result.json").unlink()
        resumed = distill(*models, blocks, tmp_path / "wrapped", settings, parallel=parallel)
    assert (wrapped.start_step, resumed.start_step) == (0, 2)
    assert resumed.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    expected = weights(tmp_path / "plain")
    for key, tensor in weights(tmp_path / "wrapped").items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6)
    assert set(expected) == set(weights(tmp_path / "wrapped"))  # tied weights saved once


# ----------------------------------------------------------------------------------------
# The intermediate-state loss


def test_projection_starts_as_the_prunings_channel_selection(models):
    teacher = load_model(models[0], torch.device("cpu"), torch.float32, trainable=False)  # 64 wide
    same_width = SimpleNamespace(config=SimpleNamespace(hidden_size=64, num_hidden_layers=2))
    aligner = HiddenStateAligner(same_width, teacher, {"teacher_layers": [1, 3]})
    assert aligner.teacher_layer_indices == [1, 3]
    torch.testing.assert_close(aligner.projection.weight, torch.eye(64))

    channels = list(range(0, 64, 2))  # a 32-wide student that kept every other channel
    narrow = SimpleNamespace(config=SimpleNamespace(hidden_size=32, num_hidden_layers=2))
    aligner = HiddenStateAligner(narrow, teacher, {"teacher_layers": [0, 1], "hidden_channels": channels})
    projected = aligner.projection(torch.eye(32))  # student channel i lands on teacher channel channels[i]
    assert [int(row.argmax()) for row in projected] == channels and projected.sum() == 32


def test_without_a_pruning_map_student_layers_spread_over_the_teachers():
    assert _teacher_layer_indices(None, 2, 4) == [1, 3]
    assert _teacher_layer_indices(None, 4, 4) == [0, 1, 2, 3]


def test_hidden_loss_is_zero_for_a_copy_of_the_teacher_and_trains_a_student(models, blocks, tmp_path):
    teacher_dir, student_dir = models
    teacher = load_model(teacher_dir, torch.device("cpu"), torch.float32, trainable=False)
    copy_of_teacher = HiddenStateAligner(load_model(teacher_dir, torch.device("cpu"), torch.float32, trainable=True),
                                         teacher, None)
    settings = steps_settings(1, hidden_loss_weight=2.0)
    loss, divergence, _, hidden = forward_loss(copy_of_teacher, teacher, blocks[:2], settings, torch.device("cpu"))
    assert abs(hidden.item()) < 1e-5 and loss.item() == pytest.approx(divergence.item() + 2 * hidden.item())

    (Path(student_dir) / "minizoo_pruning.json").write_text(json.dumps({"teacher_layers": [1, 3]}))
    try:
        distill(teacher_dir, student_dir, blocks, tmp_path, steps_settings(24, hidden_loss_weight=1.0))
    finally:
        (Path(student_dir) / "minizoo_pruning.json").unlink()
    lines = metrics(tmp_path)
    # Two epochs of the same 48 blocks (12 steps each): their means compare the same data,
    # where single steps differ by their batches as much as by training.
    first, second = (sum(line["hidden"] for line in lines[i:i + 12]) / 12 for i in (0, 12))
    assert second < 0.8 * first
    assert lines[0]["loss"] == pytest.approx(lines[0]["kl"] + lines[0]["hidden"], rel=1e-5)
    saved = weights(tmp_path)
    assert not any("projection" in name or name.startswith("student.") for name in saved)
    assert json.loads((tmp_path / "model" / "minizoo_pruning.json").read_text()) == {"teacher_layers": [1, 3]}


def test_training_with_the_hidden_loss_resumes_exactly(models, blocks, tmp_path):
    settings = steps_settings(4, checkpoint_every=2, hidden_loss_weight=1.0)
    plain = distill(*models, blocks, tmp_path / "plain", settings)
    distill(*models, blocks, tmp_path / "resumed", settings)
    (tmp_path / "resumed" / "result.json").unlink()
    resumed = distill(*models, blocks, tmp_path / "resumed", settings)  # from step 2, projection included
    assert resumed.start_step == 2 and resumed.final_loss == pytest.approx(plain.final_loss, rel=1e-6)


# ----------------------------------------------------------------------------------------
# Resume after SIGKILL


KILLED_RUN = """
import json, sys, torch
from builder.training.loop import distill
from builder.training.settings import TrainSettings
settings = TrainSettings(**json.loads(sys.argv[5]))
distill(sys.argv[1], sys.argv[2], torch.load(sys.argv[3]), sys.argv[4], settings)
"""
TOTAL_STEPS, EVERY = 120, 10


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:  # a failed test leaves no training run behind
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_with_the_same_weights(
    models, blocks, tmp_path, processes
):
    settings = steps_settings(TOTAL_STEPS, checkpoint_every=EVERY, seed=3)
    torch.save(blocks, tmp_path / "blocks.pt")
    # One thread, as in this process (see one_thread): the same float summation order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [*map(str, models), str(tmp_path / "blocks.pt"), str(tmp_path / "killed")]
    args.append(json.dumps(vars(settings)))
    killed = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *args], env=env, stderr=subprocess.DEVNULL)
    processes.append(killed)
    reference = distill(*models, blocks, tmp_path / "reference", settings)  # while it starts

    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    checkpoint_step = int(latest.read_text().removeprefix("step-"))
    assert 0 < checkpoint_step < TOTAL_STEPS
    assert not (tmp_path / "killed" / "result.json").exists()  # it really died mid-run

    resumed = distill(*models, blocks, tmp_path / "killed", settings)
    assert resumed.start_step == checkpoint_step and reference.start_step == 0
    assert resumed.final_loss == reference.final_loss
    # Same data order, optimizer, schedule and RNG state: bit-identical weights.
    expected, got = weights(tmp_path / "reference"), weights(tmp_path / "killed")
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert [m["step"] for m in metrics(tmp_path / "killed")] == list(range(1, TOTAL_STEPS + 1))
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["latest", f"step-{TOTAL_STEPS - EVERY:06d}"]
