"""Where each prunable tensor lives in a supported Hugging Face architecture, and what its axes mean.

Every tensor is described by the *units* along its dimensions:

- `hidden`: embedding channels (the residual stream), `hidden_size` of them;
- `query`: query-head channels, `num_attention_heads x head_dim`, head-major;
- `kv`: key/value-head channels, `num_key_value_heads x head_dim`, head-major;
- `mlp`: MLP neurons, `intermediate_size`;
- `head_dim`: channels inside one head (Qwen3's q/k norms), never pruned;
- `vocab`: token ids, never pruned.

That one description gives the exact parameter count of any shape (`count_params`) and tells
`builder.pruning.cuts` which rows and columns to keep in each tensor, so the two cannot disagree.

Adding an architecture (a decoder with Llama's projections: q/k/v/o, gate/up/down):
1. an `Arch` in `ARCHITECTURES`, keyed by the config's `model_type`: which projections carry
   biases (given the config), per-head q/k norms, whether vLLM derives `head_dim` from
   hidden_size / heads (`derives_head_dim`), and module names where they differ from Llama's.
   A layout outside `PROJECTIONS` (fused qkv, experts) needs new units there first;
2. its tiny model in tests/tiny_models.py's `ARCHITECTURES` (config class, model class, extra
   config keys): tests/test_arch.py then checks that `count_params` equals the instantiated
   model and that the table names every tensor, and tests/test_prune.py that each pruned axis
   acts exactly like the teacher with those units zeroed, for every architecture;
3. that vLLM serves its pruned students: add it to the architectures of
   tests/test_prune.py::test_pruned_students_generate_in_vllm;
4. the supported list in docs/writing-a-family.md; validation (`arch_for`) and rehearsals
   (which keep `model_type`) need no change. A family of it in families/ takes its teacher's
   config in tests/data/configs/ (tests/test_families.py, tests/test_rehearse.py).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig

from builder.spec.shape import SHAPE_FIELDS, Shape

Axes = tuple[str, ...]  # the unit along each dimension of a tensor

# Module-relative projections of one decoder layer: (output units, input units).
PROJECTIONS: dict[str, Axes] = {
    "self_attn.q_proj": ("query", "hidden"),
    "self_attn.k_proj": ("kv", "hidden"),
    "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "query"),
    "mlp.gate_proj": ("mlp", "hidden"),
    "mlp.up_proj": ("mlp", "hidden"),
    "mlp.down_proj": ("hidden", "mlp"),
}
ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJECTIONS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class UnsupportedArchitecture(ValueError):
    """The teacher's `model_type` has no table here."""


@dataclass(frozen=True)
class Arch:
    """One architecture's layout. All four supported ones share Llama's module names; they
    differ in which projections carry biases and in Qwen3's per-head q/k norms."""

    model_type: str
    biased: Callable[[PretrainedConfig], tuple[str, ...]]  # projections with a bias, given the config
    qk_norms: tuple[str, ...] = ()  # RMSNorms over head_dim, shared by all heads
    # vLLM's implementation ignores `head_dim` and derives hidden_size / num_attention_heads.
    derives_head_dim: bool = False
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"  # the ModuleList of decoder layers
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attention: str = "self_attn"
    mlp_down: str = "mlp.down_proj"  # its input is the MLP activation Minitron scores
    attention_out: str = "self_attn.o_proj"  # its input is the per-head attention output

    @property
    def backbone(self) -> str:
        """The decoder without the LM head (`model`), enough to score importance."""
        return self.layers.rsplit(".", 1)[0]

    def layer_tensors(self, config: PretrainedConfig) -> dict[str, Axes]:
        """Layer-relative tensor names (e.g. `mlp.up_proj.weight`) and their axes."""
        tensors = {f"{name}.weight": ("hidden",) for name in self.layer_norms}
        tensors |= {f"{name}.weight": ("head_dim",) for name in self.qk_norms}
        tensors |= {f"{name}.weight": axes for name, axes in PROJECTIONS.items()}
        tensors |= {f"{name}.bias": PROJECTIONS[name][:1] for name in self.biased(config)}
        return tensors

    def global_tensors(self, config: PretrainedConfig) -> dict[str, Axes]:
        """Tensors outside the decoder layers. A tied LM head is the embedding, not a second tensor."""
        tensors = {f"{self.embed}.weight": ("vocab", "hidden"), f"{self.final_norm}.weight": ("hidden",)}
        if not is_tied(config):
            tensors[f"{self.lm_head}.weight"] = ("vocab", "hidden")
        return tensors

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."


def _llama_biases(config: PretrainedConfig) -> tuple[str, ...]:
    attention = ATTENTION_PROJECTIONS if getattr(config, "attention_bias", False) else ()
    mlp = MLP_PROJECTIONS if getattr(config, "mlp_bias", False) else ()
    return attention + mlp


def _qwen3_biases(config: PretrainedConfig) -> tuple[str, ...]:
    return ATTENTION_PROJECTIONS if getattr(config, "attention_bias", False) else ()


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", biased=_llama_biases),
    "mistral": Arch("mistral", biased=lambda config: ()),
    # Qwen2 always has q/k/v biases and never an o_proj bias.
    "qwen2": Arch("qwen2", biased=lambda config: ATTENTION_PROJECTIONS[:3], derives_head_dim=True),
    "qwen3": Arch("qwen3", biased=_qwen3_biases, qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
}


def arch_for(config: PretrainedConfig) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported for pruning; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Pick a teacher of one of these architectures."
        )
    return ARCHITECTURES[model_type]


def is_tied(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def unit_sizes(shape: Shape, vocab_size: int) -> dict[str, int]:
    """How many of each unit a model of `shape` has."""
    return {
        "hidden": shape.hidden_size,
        "query": shape.num_attention_heads * shape.head_dim,
        "kv": shape.num_key_value_heads * shape.head_dim,
        "mlp": shape.intermediate_size,
        "head_dim": shape.head_dim,
        "vocab": vocab_size,
    }


def _numel(axes: Axes, sizes: dict[str, int]) -> int:
    count = 1
    for unit in axes:
        count *= sizes[unit]
    return count


def count_params(config: PretrainedConfig) -> int:
    """The exact parameter count of the model `config` describes, without building it."""
    arch = arch_for(config)
    sizes = unit_sizes(Shape.of(config), config.vocab_size)
    per_layer = sum(_numel(axes, sizes) for axes in arch.layer_tensors(config).values())
    outside = sum(_numel(axes, sizes) for axes in arch.global_tensors(config).values())
    return outside + config.num_hidden_layers * per_layer


# ---------------------------------------------------------------------------------------------
# Student configs


def per_layer_fields(config: PretrainedConfig) -> list[str]:
    """Config lists with one entry per layer (`layer_types`, ...) that depth pruning must subset.

    Matched by name as well as length, so a list that is only by chance as long as the
    model is deep (e.g. several `eos_token_id`s) is left alone.
    """
    layers = config.num_hidden_layers
    return [
        name for name, value in vars(config).items()
        if "layer" in name and isinstance(value, list) and len(value) == layers
    ]


def student_config(
    teacher_config: PretrainedConfig, shape: Shape, kept_layers: Sequence[int] | None = None
) -> PretrainedConfig:
    """A copy of the teacher's config with the student's shape and an explicit `head_dim`.

    `kept_layers` are the teacher layers the student keeps (in order); per-layer config lists
    follow them. Without it the first `num_hidden_layers` are assumed, which is enough for
    counting parameters before the layers are chosen.
    """
    problems = loadability_problems(shape, arch_for(teacher_config))
    if problems:
        raise ValueError("student shape cannot be loaded: " + "; ".join(problems))
    kept = list(kept_layers) if kept_layers is not None else list(range(shape.num_hidden_layers))
    if len(kept) != shape.num_hidden_layers:
        raise ValueError(
            f"kept_layers has {len(kept)} entries but num_hidden_layers is {shape.num_hidden_layers}; "
            "pass one teacher layer index per student layer"
        )
    config = copy.deepcopy(teacher_config)
    for name in per_layer_fields(teacher_config):
        setattr(config, name, [getattr(teacher_config, name)[i] for i in kept])
    for name, value in shape.as_dict().items():
        setattr(config, name, value)
    _validate(config)
    return config


def _validate(config: PretrainedConfig) -> None:
    # transformers >= 5 checks configs on construction only; run the same checks after editing.
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()


# ---------------------------------------------------------------------------------------------
# Which student shapes a teacher can reach


def shape_problems(teacher_config: PretrainedConfig, shape: Shape) -> list[str]:
    """Every reason `shape` cannot be pruned from this teacher or loaded afterwards.

    Each message names the field, its value and a fix. An empty list means the shape is fine.
    """
    arch = arch_for(teacher_config)
    teacher = Shape.of(teacher_config)
    problems = _size_problems(teacher, shape)
    if any(getattr(shape, name) < 1 for name in SHAPE_FIELDS):
        return problems  # the divisibility rules below need positive values
    return problems + loadability_problems(shape, arch, teacher) + _reachability_problems(teacher, shape)


def _size_problems(teacher: Shape, shape: Shape) -> list[str]:
    problems = []
    for name in SHAPE_FIELDS:
        value, limit = getattr(shape, name), getattr(teacher, name)
        if value < 1:
            problems.append(f"{name}={value} must be at least 1")
        elif value > limit:
            problems.append(
                f"{name}={value} is larger than the teacher's {limit}; pruning only removes units, "
                f"so choose {name} <= {limit}"
            )
    if shape.head_dim != teacher.head_dim:
        problems.append(
            f"head_dim={shape.head_dim} differs from the teacher's {teacher.head_dim}; pruning keeps "
            f"every head whole, so set head_dim={teacher.head_dim}"
        )
    return problems


def loadability_problems(shape: Shape, arch: Arch, teacher: Shape | None = None) -> list[str]:
    """Rules transformers and vLLM impose on any config. With `teacher`, the suggested fixes
    are limited to shapes that teacher can reach."""
    limit = teacher or shape
    problems = []
    if shape.hidden_size % shape.num_attention_heads:
        problems.append(_hidden_not_divisible(shape, limit))
    if shape.num_attention_heads % shape.num_key_value_heads:
        problems.append(_heads_not_grouped(shape, limit))
    if arch.derives_head_dim and shape.num_attention_heads * shape.head_dim != shape.hidden_size:
        problems.append(_head_dim_not_derivable(shape, arch))
    return problems


def _reachable_head_counts(shape: Shape, limit: Shape) -> list[int]:
    """Query head counts that keep the student's key/value groups equal and within `limit`'s."""
    group_limit = max(limit.num_attention_heads // limit.num_key_value_heads, 1)
    if limit is shape:  # no teacher known: any group size up to the requested head count
        group_limit = shape.num_attention_heads
    return [shape.num_key_value_heads * g for g in range(1, group_limit + 1)]


def _hidden_not_divisible(shape: Shape, limit: Shape) -> str:
    heads, hidden = shape.num_attention_heads, shape.hidden_size
    head_choices = [h for h in _reachable_head_counts(shape, limit) if hidden % h == 0]
    hidden_choices = [m for m in range(heads, limit.hidden_size + 1, heads)]
    fixes = [f"hidden_size in {_nearest(hidden_choices, hidden)}"] if hidden_choices else []
    if head_choices:
        fixes.insert(0, f"num_attention_heads in {_nearest(head_choices, heads)}")
    return (
        f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} (transformers and "
        f"vLLM require it even with head_dim set); use {' or '.join(fixes) or 'fewer heads'}"
    )


def _heads_not_grouped(shape: Shape, limit: Shape) -> str:
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    kv_choices = [k for k in range(1, limit.num_key_value_heads + 1) if heads % k == 0]
    return (
        f"num_attention_heads={heads} does not split evenly into num_key_value_heads={kv} groups; "
        f"use num_key_value_heads in {_nearest(kv_choices, kv)} or num_attention_heads in "
        f"{_nearest(_reachable_head_counts(shape, limit), heads)}"
    )


def _head_dim_not_derivable(shape: Shape, arch: Arch) -> str:
    heads, head_dim, hidden = shape.num_attention_heads, shape.head_dim, shape.hidden_size
    fix = f"set hidden_size={heads * head_dim}"
    if hidden % head_dim == 0:
        fix += f" or num_attention_heads={hidden // head_dim}"
    return (
        f"num_attention_heads={heads} x head_dim={head_dim} must equal hidden_size={hidden} for "
        f"{arch.model_type} (vLLM's {arch.model_type} ignores head_dim and derives it from "
        f"hidden_size / num_attention_heads); {fix}"
    )


def _reachability_problems(teacher: Shape, shape: Shape) -> list[str]:
    """GQA: query heads are pruned inside their key/value group and every group keeps the same
    number, so a student can have at most the teacher's heads per group."""
    teacher_group = teacher.num_attention_heads // teacher.num_key_value_heads
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    if heads % kv or heads // kv <= teacher_group:
        return []
    valid = [kv * g for g in range(1, teacher_group + 1) if shape.hidden_size % (kv * g) == 0]
    kv_choices = [k for k in range(1, teacher.num_key_value_heads + 1)
                  if heads % k == 0 and heads // k <= teacher_group]
    fix = f"use num_attention_heads in {_nearest(valid, heads)}" if valid else (
        f"no head count divides hidden_size={shape.hidden_size} with {kv} groups")
    if kv_choices:
        fix += f", or num_key_value_heads in {_nearest(kv_choices, kv)}"
    return [
        f"num_attention_heads={heads} with num_key_value_heads={kv} needs {heads // kv} query heads "
        f"per key/value group, but the teacher's groups have only {teacher_group} "
        f"({teacher.num_attention_heads} heads / {teacher.num_key_value_heads} groups) and pruning "
        f"cannot add heads; {fix}"
    ]


def _nearest(choices: list[int], target: int, count: int = 3) -> list[int]:
    """The `count` choices closest to `target`, in ascending order (for "did you mean" hints)."""
    return sorted(sorted(set(choices), key=lambda c: (abs(c - target), c))[:count])
