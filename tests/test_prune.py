"""Structured pruning: each axis is checked against the teacher with the same units switched off.

A pruned unit removed from the weights must act exactly like the unit zeroed in the teacher:
MLP neurons (down_proj columns), attention heads (o_proj input columns), layers (skipped) and
embedding channels (zeroed everywhere they enter the residual stream; RMSNorm then averages
over fewer channels, which the zeroed teacher mimics by scaling its norm weights).

Run: .venv/bin/pytest tests/test_prune.py -q   (the vLLM test takes most of its time)
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from builder.pruning.importance import Importance, score_importance, skipping_layers
from builder.pruning.cuts import (
    head_channels,
    prune_model,
    read_pruning_map,
    save_pruning_map,
    select_heads,
    select_layers,
    top_indices,
)
from builder.spec.shape import Shape
from tiny_models import ARCHITECTURES, TINY_VOCAB, tiny_model, tiny_tokenizer, one_thread  # noqa: F401 (autouse fixture)

ARCHS = sorted(ARCHITECTURES)
NORMS = ("input_layernorm", "post_attention_layernorm")




def tokens(samples: int = 3, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def random_importance(model, seed: int = 0, layer_loss: bool = True) -> Importance:
    """Arbitrary scores, so kept units are scattered rather than the first few."""
    shape, g = Shape.of(model.config), torch.Generator().manual_seed(seed)
    layers = shape.num_hidden_layers
    return Importance(
        mlp=torch.rand(layers, shape.intermediate_size, generator=g),
        heads=torch.rand(layers, shape.num_attention_heads, generator=g),
        hidden=torch.rand(shape.hidden_size, generator=g),
        block=torch.rand(layers, generator=g),
        layer_loss=torch.rand(layers, generator=g) if layer_loss else None,
        teacher_shape=shape, model_type=model.config.model_type, batch_aggregation="l2",
        sequence_aggregation="mean", num_samples=1, seq_len=1,
    )


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def dropped(scores: torch.Tensor, keep: int) -> list[int]:
    kept = set(top_indices(scores, keep).tolist())
    return [i for i in range(scores.numel()) if i not in kept]


def zero_pruned_units(teacher, importance: Importance, shape: Shape):
    """A copy of the teacher with every unit the student loses switched off (not removed)."""
    model, t = copy.deepcopy(teacher), importance.teacher_shape
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, dropped(importance.mlp[index], shape.intermediate_size)] = 0
            query, _ = select_heads(importance.heads[index], t, shape)
            lost_heads = torch.tensor([h for h in range(t.num_attention_heads) if h not in query.tolist()],
                                      dtype=torch.long)
            layer.self_attn.o_proj.weight[:, head_channels(lost_heads, t.head_dim)] = 0
        _zero_channels(model, dropped(importance.hidden, shape.hidden_size), shape.hidden_size / t.hidden_size)
    return model


def _zero_channels(model, channels: list[int], kept_fraction: float) -> None:
    """Nothing writes to `channels` of the residual stream; norms see sqrt(D/D') larger inputs."""
    if not channels:
        return
    model.model.embed_tokens.weight[:, channels] = 0
    scale = kept_fraction ** 0.5
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[channels, :] = 0
        layer.mlp.down_proj.weight[channels, :] = 0
        for norm in NORMS:
            getattr(layer, norm).weight.mul_(scale)
    model.model.norm.weight.mul_(scale)


def check_equivalent(arch: str, changes: dict, **overrides) -> None:
    # A vanishing eps keeps RMSNorm exactly scale-free, which the hidden-channel comparison needs.
    teacher = tiny_model(arch, seed=1, rms_norm_eps=1e-12, **overrides)
    importance = random_importance(teacher)
    shape = Shape.of(teacher.config).replace(**changes)
    student = prune_model(teacher, importance, shape)
    expected = logits(zero_pruned_units(teacher, importance, shape), tokens())
    torch.testing.assert_close(logits(student, tokens()), expected, rtol=1e-4, atol=1e-5)
    assert (logits(teacher, tokens()) - expected).abs().max() > 1e-3  # something was really pruned
    assert Shape.of(student.config) == shape
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# Each axis against the zeroed teacher


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_nothing_gives_identical_logits(arch):
    teacher = tiny_model(arch, seed=1)
    student = prune_model(teacher, random_importance(teacher), Shape.of(teacher.config))
    assert torch.equal(logits(student, tokens()), logits(teacher, tokens()))


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_mlp_neurons_act_as_zeroed_down_proj_columns(arch):
    check_equivalent(arch, {"intermediate_size": 40})


# Qwen2 must keep heads x head_dim == hidden (vLLM), so its head cases prune hidden channels too.
HEAD_CASES = {
    "within groups": {"num_attention_heads": 4, "num_key_value_heads": 2},
    "whole groups": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "both": {"num_attention_heads": 3, "num_key_value_heads": 1, "hidden_size": 48},  # 64 % 3 != 0
}


@pytest.mark.parametrize("case", HEAD_CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_heads_act_as_zeroed_o_proj_columns(arch, case):
    # 8 query heads in 2 groups of 4 (head_dim 8), so heads can go within groups and with them.
    changes = dict(HEAD_CASES[case])
    if arch == "qwen2":
        changes["hidden_size"] = changes["num_attention_heads"] * 8
    check_equivalent(arch, changes, num_attention_heads=8, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pruned_hidden_channels_act_as_zeroed_residual_channels(arch, tied):
    check_equivalent(arch, {"hidden_size": 40}, tie_word_embeddings=tied)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_width_axis_at_once(arch):
    changes = {"hidden_size": 32, "intermediate_size": 72, "num_attention_heads": 2, "num_key_value_heads": 1}
    check_equivalent(arch, changes, tie_word_embeddings=arch != "mistral")


@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_layers_act_as_skipped_layers(arch):
    teacher = tiny_model(arch, seed=1)
    importance = random_importance(teacher)
    student = prune_model(teacher, importance, Shape.of(teacher.config).replace(num_hidden_layers=2))
    lost = dropped(importance.block, 2)
    with skipping_layers(teacher, lost):
        expected = logits(teacher, tokens())
    torch.testing.assert_close(logits(student, tokens()), expected, rtol=1e-5, atol=1e-6)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]


def test_width_and_depth_with_biases_and_an_untied_head():
    overrides = dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    teacher = tiny_model("llama", seed=2, rms_norm_eps=1e-12, **overrides)
    importance = random_importance(teacher)
    shape = Shape.of(teacher.config).replace(hidden_size=48, intermediate_size=64, num_attention_heads=2,
                                             num_key_value_heads=1, num_hidden_layers=3)
    zeroed = zero_pruned_units(teacher, importance, shape)
    with torch.no_grad():  # biases that write into the residual stream must not fill pruned channels
        for layer in zeroed.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.bias[dropped(importance.hidden, 48)] = 0
    with skipping_layers(zeroed, dropped(importance.block, 3)):
        expected = logits(zeroed, tokens())
    student = prune_model(teacher, importance, shape)
    torch.testing.assert_close(logits(student, tokens()), expected, rtol=1e-4, atol=1e-5)
    assert student.lm_head.weight.shape == (TINY_VOCAB, 48)


# ---------------------------------------------------------------------------------------------
# Choosing units


def test_heads_are_ranked_within_their_group():
    teacher = Shape(64, 128, 8, 2, 4, 8)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.7, 0.6])  # groups [0..3] and [4..7]
    query, kv = select_heads(scores, teacher, teacher.replace(num_attention_heads=4))
    assert query.tolist() == [1, 2, 4, 6] and kv.tolist() == [0, 1]  # 2 best per group, not 2 best overall


def test_whole_groups_go_by_summed_importance():
    teacher = Shape(64, 128, 8, 2, 4, 8)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.4, 0.3, 0.7, 0.6])  # sums 1.7 and 2.0
    query, kv = select_heads(scores, teacher, teacher.replace(num_attention_heads=3, num_key_value_heads=1))
    assert kv.tolist() == [1] and query.tolist() == [4, 6, 7]


def importance_with(block, layer_loss=None) -> Importance:
    layers = len(block)
    return Importance(
        mlp=torch.zeros(layers, 1), heads=torch.zeros(layers, 1), hidden=torch.zeros(1),
        block=torch.tensor(block), layer_loss=None if layer_loss is None else torch.tensor(layer_loss),
        teacher_shape=Shape(1, 1, 1, 1, layers, 1), model_type="llama", batch_aggregation="l2",
        sequence_aggregation="mean", num_samples=1, seq_len=1)


def test_depth_methods():
    scores = importance_with([0.9, 0.1, 0.5, 0.2, 0.3, 0.8], layer_loss=[0.1, 0.9, 0.3, 0.4, 0.2, 0.5])
    assert select_layers(scores, 4, "block_importance") == [0, 2, 4, 5]
    assert select_layers(scores, 4, "lm_loss") == [1, 2, 3, 5]
    assert select_layers(scores, 4, "contiguous") == [0, 1, 2, 5]  # 0.2 + 0.3 is the cheapest run of two
    assert select_layers(scores, 4, "last") == [0, 1, 2, 3]
    assert select_layers(scores, 6, "contiguous") == list(range(6))


def test_lm_loss_depth_needs_lm_loss_scores():
    with pytest.raises(ValueError, match="lm_loss_samples=0; set scoring.lm_loss_samples > 0"):
        select_layers(importance_with([0.1, 0.2]), 1, "lm_loss")


def test_unknown_depth_method():
    with pytest.raises(ValueError, match="depth_method='middle' is unknown; use one of block_importance"):
        select_layers(importance_with([0.1, 0.2]), 1, "middle")


# ---------------------------------------------------------------------------------------------
# The student as a model


def test_teacher_is_untouched_and_shares_no_storage():
    teacher = tiny_model("qwen2", seed=3)
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = prune_model(teacher, random_importance(teacher), Shape.of(teacher.config))
    assert all(torch.equal(before[name], tensor) for name, tensor in teacher.state_dict().items())
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_storage & {p.data_ptr() for p in student.parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_student_reloads_with_plain_from_pretrained(arch, tmp_path):
    teacher = tiny_model(arch, seed=4)
    shape = Shape.of(teacher.config).replace(hidden_size=32, intermediate_size=96, num_attention_heads=2,
                                             num_key_value_heads=1, num_hidden_layers=3)
    student = prune_model(teacher, random_importance(teacher), shape)
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, tokens()), logits(student, tokens()))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # tied stays tied


def test_depth_pruned_student_generates_with_a_kv_cache():
    """layer_idx renumbering and the per-layer `layer_types` list must match the kept layers."""
    teacher = tiny_model("qwen2", seed=5, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    importance = random_importance(teacher)
    importance.block = torch.tensor([0.1, 0.9, 0.2, 0.8])  # keeps layers 1 and 3
    student = prune_model(teacher, importance, Shape.of(teacher.config).replace(num_hidden_layers=2))
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    prompt = tokens(1, 10)
    with torch.no_grad():
        cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with skipping_layers(teacher, [0, 2]):
        expected = logits(teacher, cached)
    torch.testing.assert_close(logits(student, cached), expected, rtol=1e-5, atol=1e-6)


def test_scores_from_another_teacher_are_refused():
    teacher = tiny_model("llama")
    other = random_importance(tiny_model("llama", intermediate_size=96))
    with pytest.raises(ValueError, match="rescore this teacher"):
        prune_model(teacher, other, Shape.of(teacher.config))


def test_unreachable_shape_is_refused_with_every_problem():
    teacher = tiny_model("llama")
    shape = Shape.of(teacher.config).replace(intermediate_size=256, num_attention_heads=3)
    with pytest.raises(ValueError, match="(?s)intermediate_size=256 is larger.*not a multiple of"):
        prune_model(teacher, random_importance(teacher), shape)


def test_quantized_teacher_is_refused():
    teacher = tiny_model("llama")
    teacher.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="prune a dequantized float checkpoint"):
        prune_model(teacher, random_importance(teacher), Shape.of(teacher.config))


def test_the_pruning_map_names_the_teacher_units_each_student_unit_came_from(tmp_path):
    teacher = tiny_model("llama", seed=8)
    importance = random_importance(teacher, seed=3)
    shape = Shape.of(teacher.config).replace(hidden_size=48, num_hidden_layers=3)
    student = prune_model(teacher, importance, shape, depth_method="block_importance")
    recorded = save_pruning_map(tmp_path, importance, shape, "block_importance")
    assert read_pruning_map(tmp_path) == recorded
    assert recorded["teacher_layers"] == select_layers(importance, 3, "block_importance")
    channels = recorded["hidden_channels"]
    assert len(channels) == 48 and channels == sorted(channels)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, channels])
    layer = recorded["teacher_layers"][1]
    torch.testing.assert_close(student.model.layers[1].mlp.down_proj.weight,
                               teacher.model.layers[layer].mlp.down_proj.weight[channels])
    assert read_pruning_map(tmp_path / "nothing") is None


def test_real_scores_prune_end_to_end():
    teacher = tiny_model("qwen3", seed=6)
    importance = score_importance(teacher, tokens(4, 16), batch_size=2, progress=False)
    shape = Shape.of(teacher.config).replace(hidden_size=48, intermediate_size=64, num_hidden_layers=3)
    student = prune_model(teacher, importance, shape, depth_method="contiguous")
    assert logits(student, tokens()).isfinite().all()


# ---------------------------------------------------------------------------------------------
# vLLM (optional: only where it is installed)

VLLM_SCRIPT = textwrap.dedent("""
    import sys
    if __name__ == "__main__":  # vLLM starts its workers with spawn
        from vllm import LLM, SamplingParams
        for path in sys.argv[1:]:
            llm = LLM(model=path, enforce_eager=True, dtype="float32", max_model_len=64,
                      distributed_executor_backend="uni")  # in this process: see run's env
            params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            out = llm.generate(["The state of the union"], params)
            print("TOKENS", path, len(out[0].outputs[0].token_ids), flush=True)
            del llm
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_pruned_students_generate_in_vllm(tmp_path):
    """One pruned student per architecture, engines one after another in one process;
    Llama's students are served by vLLM in test_e2e.py. Qwen2 is the
    fragile one: vLLM derives its head_dim from hidden_size / heads."""
    # vLLM's CPU attention needs head_dim >= 32, so these teachers are wider than the others.
    wide = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    paths = []
    for arch in ("mistral", "qwen2", "qwen3"):
        teacher = tiny_model(arch, seed=7, **wide)
        shape = Shape.of(teacher.config).replace(hidden_size=64, intermediate_size=64, num_attention_heads=2,
                                                 num_key_value_heads=1, num_hidden_layers=2)
        paths.append(tmp_path / arch)
        prune_model(teacher, random_importance(teacher), shape).save_pretrained(paths[-1])
        tiny_tokenizer().save_pretrained(paths[-1])
    (tmp_path / "run.py").write_text(VLLM_SCRIPT)
    # The engine inside this one process (no engine-core and worker processes to start per
    # model): what is tested is that vLLM loads and runs each architecture.
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "cache"),
                        "VLLM_RPC_BASE_PATH": str(tmp_path), "HF_HUB_OFFLINE": "1",
                        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run([sys.executable, str(tmp_path / "run.py"), *map(str, paths)],
                         env=env, capture_output=True, text=True, timeout=600)
    for path in paths:
        assert f"TOKENS {path} 8" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]
