"""Architecture tables, exact parameter counts, student configs and reachable shapes.

Run: .venv/bin/pytest tests/test_arch.py -q   (a few seconds on 2 cores)
"""
from __future__ import annotations

import pytest
import torch
import transformers

from builder.models.arch import (
    ARCHITECTURES,
    UnsupportedArchitecture,
    arch_for,
    count_params,
    shape_problems,
    student_config,
)
from builder.spec.shape import Shape
from tiny_models import ARCHITECTURES as TINY_ARCHITECTURES, tiny_config, tiny_model, one_thread  # noqa: F401 (autouse fixture)



ARCHS = sorted(TINY_ARCHITECTURES)
VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "biases": {"attention_bias": True, "mlp_bias": True},  # Llama and Qwen3 grow biases; others ignore
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_config(config)


def test_every_tiny_architecture_has_a_table():
    assert set(ARCHS) == set(ARCHITECTURES)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_count_params_equals_the_instantiated_model(arch, variant):
    model = tiny_model(arch, **VARIANTS[variant])
    assert count_params(model.config) == n_params(model)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_table_names_every_tensor_of_the_model(arch, variant):
    config = tiny_config(arch, **VARIANTS[variant])
    table = ARCHITECTURES[arch]
    named = set(table.global_tensors(config))
    for index in range(config.num_hidden_layers):
        named |= {table.layer_prefix(index) + name for name in table.layer_tensors(config)}
    actual = {name for name, _ in build(config).named_parameters()}  # a tied head is listed once
    assert named == actual


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_count_params_of_a_width_and_depth_pruned_student(arch, tied):
    teacher = tiny_config(arch, tie_word_embeddings=tied)
    shape = Shape.of(teacher).replace(hidden_size=32, intermediate_size=96, num_attention_heads=2,
                                      num_key_value_heads=1, num_hidden_layers=3)
    config = student_config(teacher, shape)
    assert count_params(config) == n_params(build(config))
    assert count_params(config) < count_params(teacher)


def test_student_config_copies_the_teacher_with_the_new_shape():
    teacher = tiny_config("llama", rope_theta=5e5)
    shape = Shape.of(teacher).replace(hidden_size=48, num_attention_heads=2, num_key_value_heads=1)
    config = student_config(teacher, shape)
    assert Shape.of(config) == shape
    assert config.head_dim == 16 and "head_dim" in config.to_dict()  # explicit: 48 / 2 != 16
    assert config.rope_parameters == teacher.rope_parameters
    assert teacher.hidden_size == 64  # the teacher's config is not modified


def test_student_config_subsets_per_layer_lists_by_kept_layers():
    teacher = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert teacher.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    shape = Shape.of(teacher).replace(num_hidden_layers=2)
    config = student_config(teacher, shape, kept_layers=[1, 3])
    assert config.layer_types == ["full_attention", "sliding_attention"]
    assert student_config(teacher, shape).layer_types == ["full_attention"] * 2  # default: first layers


def test_student_config_refuses_a_wrong_number_of_kept_layers():
    teacher = tiny_config("llama")
    with pytest.raises(ValueError, match="kept_layers has 3 entries but num_hidden_layers is 2"):
        student_config(teacher, Shape.of(teacher).replace(num_hidden_layers=2), kept_layers=[0, 1, 2])


def test_student_config_refuses_a_shape_transformers_cannot_load():
    teacher = tiny_config("llama")
    with pytest.raises(ValueError, match="hidden_size=64 is not a multiple of num_attention_heads=3"):
        student_config(teacher, Shape.of(teacher).replace(num_attention_heads=3, num_key_value_heads=1))


def test_arch_for_names_the_model_type_and_the_supported_list():
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2' .*llama, mistral, qwen2, qwen3"):
        arch_for(transformers.GPT2Config(n_layer=1))
    assert issubclass(UnsupportedArchitecture, ValueError)


# ---------------------------------------------------------------------------------------------
# shape_problems: one test per kind of message


def problems(arch: str = "llama", **changes) -> list[str]:
    teacher = tiny_config(arch)
    return shape_problems(teacher, Shape.of(teacher).replace(**changes))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("changes", [
    {},  # the teacher itself
    {"intermediate_size": 100, "num_hidden_layers": 1},
    {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2},  # whole heads in each group
    {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},  # one group of two
    {"hidden_size": 16, "num_attention_heads": 1, "num_key_value_heads": 1},
])
def test_reachable_shapes_have_no_problems(arch, changes):
    assert problems(arch, **changes) == []


def test_larger_than_teacher():
    [message] = problems(intermediate_size=256)
    assert "intermediate_size=256 is larger than the teacher's 128" in message
    assert "choose intermediate_size <= 128" in message


def test_not_positive():
    found = problems(num_hidden_layers=0)
    assert found == ["num_hidden_layers=0 must be at least 1"]


def test_head_dim_changed():
    [message] = problems(head_dim=8)
    assert "head_dim=8 differs from the teacher's 16" in message and "set head_dim=16" in message


def test_hidden_not_a_multiple_of_heads_suggests_nearby_values():
    [message] = problems(hidden_size=50, num_attention_heads=4, num_key_value_heads=2)
    assert "hidden_size=50 is not a multiple of num_attention_heads=4" in message
    # 2 heads (one per group) divide 50; or the multiples of 4 nearest 50, within the teacher's 64
    assert "use num_attention_heads in [2] or hidden_size in [44, 48, 52]" in message


def test_heads_do_not_split_into_groups():
    found = problems(hidden_size=48, num_attention_heads=3, num_key_value_heads=2)
    [message] = [m for m in found if "split evenly" in m]
    assert "num_attention_heads=3 does not split evenly into num_key_value_heads=2 groups" in message
    assert "num_key_value_heads in [1]" in message and "num_attention_heads in [2, 4]" in message


def test_more_heads_per_group_than_the_teacher_has():
    [message] = problems(num_attention_heads=4, num_key_value_heads=1)
    assert "needs 4 query heads per key/value group, but the teacher's groups have only 2" in message
    assert "num_attention_heads in [1, 2]" in message and "num_key_value_heads in [2]" in message


def test_qwen2_needs_heads_times_head_dim_to_equal_hidden_for_vllm():
    [message] = problems("qwen2", hidden_size=48)
    assert "num_attention_heads=4 x head_dim=16 must equal hidden_size=48 for qwen2" in message
    assert "set hidden_size=64 or num_attention_heads=3" in message
    assert problems("llama", hidden_size=48) == []  # vLLM's Llama reads head_dim


def test_all_problems_are_reported_at_once():
    found = problems(hidden_size=80, num_attention_heads=3, num_key_value_heads=2)
    assert len(found) == 3  # larger hidden, hidden % heads, heads % groups


@pytest.mark.parametrize("changes", [
    {"hidden_size": 80, "num_attention_heads": 3, "num_key_value_heads": 2},
    {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "num_hidden_layers": 0},
])
def test_messages_start_with_the_field_they_are_about(changes):
    """builder.planning.validate points each message at `<field>=` in the user's spec."""
    for message in problems("qwen2", **changes):
        assert message.split("=", 1)[0] in (*Shape.__dataclass_fields__,), message
