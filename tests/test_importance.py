"""Minitron importance hooks against a direct computation on captured activations.

Run: .venv/bin/pytest tests/test_importance.py -q   (a few seconds on 2 cores, plus imports)
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from builder.pruning.importance import Importance, score_importance
from builder.spec.shape import Shape
from tiny_models import ARCHITECTURES, TINY_VOCAB, tiny_model, one_thread  # noqa: F401 (autouse fixture)



ARCHS = sorted(ARCHITECTURES)
NORMS = ("input_layernorm", "post_attention_layernorm")


def calibration(samples: int = 6, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def capture(model, blocks) -> dict[str, list[torch.Tensor]]:
    """Every activation the scores are made of, for the whole calibration set in one batch."""
    seen: dict[str, list[torch.Tensor]] = {"mlp": [], "attn": [], "norms": [], "layer_in": [], "layer_out": []}
    handles = []
    for layer in model.model.layers:
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args: seen["mlp"].append(args[0].clone())))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args: seen["attn"].append(args[0].clone())))
        for norm in NORMS:
            handles.append(getattr(layer, norm).register_forward_hook(
                lambda m, args, out: seen["norms"].append(out.clone())))
        handles.append(layer.register_forward_hook(
            lambda m, args, out: seen["layer_in"].append(args[0].clone())))
        handles.append(layer.register_forward_hook(
            lambda m, args, out: seen["layer_out"].append(out.clone())))
    with torch.no_grad():
        model(blocks, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def naive_channel_scores(x: torch.Tensor, sequence: str, batch: str) -> torch.Tensor:
    """The definitions, written out: reduce [batch, seq, channels] over seq, then over batch."""
    per_sample = {
        "mean": lambda: x.abs().mean(dim=1),
        "l2": lambda: x.pow(2).sum(dim=1).sqrt(),
        "var": lambda: ((x - x.mean(dim=1, keepdim=True)) ** 2).mean(dim=1),
    }[sequence]().double()
    return {
        "mean": lambda: per_sample.mean(dim=0),
        "l2": lambda: per_sample.pow(2).sum(dim=0).sqrt(),
        "var": lambda: ((per_sample - per_sample.mean(dim=0)) ** 2).mean(dim=0),
    }[batch]().float()


@pytest.mark.parametrize("sequence,batch", [("mean", "l2"), ("l2", "mean"), ("var", "var"), ("mean", "var")])
def test_scores_match_a_direct_computation(sequence, batch):
    model, blocks = tiny_model("qwen3", seed=1), calibration()
    got = score_importance(model, blocks, batch_size=4, batch_aggregation=batch,
                           sequence_aggregation=sequence, progress=False)
    seen = capture(model, blocks)
    mlp = torch.stack([naive_channel_scores(x, sequence, batch) for x in seen["mlp"]])
    heads = torch.stack([naive_channel_scores(x, sequence, batch).view(4, 16).norm(dim=1) for x in seen["attn"]])
    hidden = sum(naive_channel_scores(x, sequence, batch) for x in seen["norms"])
    torch.testing.assert_close(got.mlp, mlp, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.heads, heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.hidden, hidden, rtol=1e-4, atol=1e-7)


def test_block_importance_matches_a_direct_computation():
    model, blocks = tiny_model("llama", seed=2), calibration()
    got = score_importance(model, blocks, batch_size=4, progress=False)
    seen = capture(model, blocks)
    expected = torch.stack([(1 - F.cosine_similarity(i, o, dim=-1)).mean()
                            for i, o in zip(seen["layer_in"], seen["layer_out"])])
    torch.testing.assert_close(got.block, expected, rtol=1e-4, atol=1e-7)


def silence_layer(model, index: int) -> None:
    """Make a decoder layer the identity: nothing is added to the residual stream."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_block_importance_of_an_identity_layer_is_zero():
    model = tiny_model("mistral", seed=3)
    silence_layer(model, 2)
    block = score_importance(model, calibration(), progress=False).block
    assert block[2].abs() < 1e-6
    assert (block[[0, 1, 3]] > 1e-3).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_batching_does_not_change_the_scores(arch):
    model, blocks = tiny_model(arch, seed=4), calibration(samples=5)
    one = score_importance(model, blocks, batch_size=1, batch_aggregation="var", progress=False)
    all_at_once = score_importance(model, blocks, batch_size=5, batch_aggregation="var", progress=False)
    for name in ("mlp", "heads", "hidden", "block"):
        torch.testing.assert_close(getattr(one, name), getattr(all_at_once, name), rtol=1e-4, atol=1e-7)
    assert one.mlp.shape == (4, 128) and one.heads.shape == (4, 4) and one.hidden.shape == (64,)


def naive_loss_without(model, blocks, index: int | None) -> float:
    """LM loss of a copy of `model` whose layer `index` is deleted outright."""
    model = copy.deepcopy(model)
    if index is not None:
        del model.model.layers[index]
        model.config.num_hidden_layers -= 1
    with torch.no_grad():  # no cache: the remaining layers keep their old layer_idx
        logits = model(blocks, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item()


def test_layer_loss_is_the_loss_increase_when_a_layer_is_removed():
    model, blocks = tiny_model("llama", seed=5), calibration(samples=4)
    silence_layer(model, 1)
    got = score_importance(model, blocks, batch_size=3, lm_loss_samples=3, progress=False)
    baseline = naive_loss_without(model, blocks[:3], None)
    expected = torch.tensor([naive_loss_without(model, blocks[:3], i) - baseline for i in range(4)])
    torch.testing.assert_close(got.layer_loss, expected, rtol=1e-3, atol=1e-5)
    assert got.layer_loss[1].abs() < 1e-5 and got.layer_loss.abs().max() > 1e-3
    assert got.lm_loss_samples == 3


@pytest.mark.parametrize("with_layer_loss", [True, False])
def test_save_and_load_round_trip(tmp_path, with_layer_loss):
    model, blocks = tiny_model("qwen2", seed=6), calibration(samples=3, seq_len=8)
    scores = score_importance(model, blocks, lm_loss_samples=2 if with_layer_loss else 0, progress=False)
    scores.save(tmp_path / "scores")
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["importance.json", "importance.safetensors"]
    loaded = Importance.load(tmp_path / "scores")
    for name in ("mlp", "heads", "hidden", "block"):
        assert torch.equal(getattr(loaded, name), getattr(scores, name))
    assert (loaded.layer_loss is None) == (not with_layer_loss)
    assert loaded.teacher_shape == Shape.of(model.config) and loaded.model_type == "qwen2"
    assert (loaded.num_samples, loaded.seq_len, loaded.batch_aggregation) == (3, 8, "l2")


def test_scoring_leaves_the_model_as_it_was():
    model, blocks = tiny_model("llama", seed=7).train(), calibration(samples=2, seq_len=8)
    score_importance(model, blocks, progress=False)
    assert model.training
    assert all(not layer._forward_hooks and not layer.mlp.down_proj._forward_pre_hooks
               for layer in model.model.layers)


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_aggregation": "max"}, "batch_aggregation='max' is not an aggregation; use one of mean, l2, var"),
    ({"sequence_aggregation": "sum"}, "sequence_aggregation='sum' is not an aggregation"),
    ({"lm_loss_samples": 9}, "lm_loss_samples=9 must be between 0 and the 2 calibration blocks"),
    ({"batch_size": 0}, "batch_size=0 must be at least 1"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        score_importance(tiny_model("llama"), calibration(samples=2, seq_len=8), progress=False, **kwargs)


def test_blocks_must_be_token_ids():
    with pytest.raises(ValueError, match="non-empty LongTensor"):
        score_importance(tiny_model("llama"), torch.zeros(2, 8), progress=False)
