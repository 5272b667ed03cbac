"""Structured Minitron pruning of a Hugging Face model: keep the most important units, drop the rest.

Every axis is cut by slicing the teacher's tensors along the units `builder.models.arch` names for
each dimension, then loading them into a fresh model built from the student config. The
teacher is left untouched, so one loaded teacher can give every student of a family.

- MLP: each layer keeps its own most important neurons (gate/up rows, down columns).
- Attention (GQA): query heads are ranked within their key/value group and every group keeps
  the same number; with fewer key/value heads, whole groups go first, ranked by the summed
  importance of their heads. k/v rows (and Qwen2's biases) follow their group. Heads keep
  `head_dim`, so Qwen3's per-head q/k norms are unchanged.
- Embedding channels: one global choice, applied to the embedding, every norm, every
  projection's input or output side and an untied LM head (a tied one stays tied).
- Depth: see `select_layers`.

Units are kept in their original order; only membership changes.
"""
from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from builder.models.arch import Arch, Axes, arch_for, is_tied, shape_problems, student_config, unit_sizes
from builder.pruning.importance import Importance
from builder.spec.shape import Shape

DEPTH_METHODS = ("block_importance", "lm_loss", "contiguous", "last")

Keep = Mapping[str, torch.Tensor | None]  # unit -> indices to keep (None keeps all)
# Saved beside a pruned checkpoint: which teacher layers and embedding channels it kept. The
# distillation's hidden-state loss pairs layers and initialises its projection from it.
PRUNING_MAP = "minizoo_pruning.json"


def prune_model(model: PreTrainedModel, importance: Importance, shape: Shape,
                depth_method: str = "block_importance") -> PreTrainedModel:
    """A new model of `shape` holding the teacher's most important units (the teacher is unchanged)."""
    _check_request(model, importance, shape)
    arch = arch_for(model.config)
    kept_layers = select_layers(importance, shape.num_hidden_layers, depth_method)
    state = pruned_state_dict(model, arch, importance, shape, kept_layers)
    config = student_config(model.config, shape, kept_layers)
    return _build_student(model, config, state, arch, kept_layers)


def pruning_map(importance: Importance, shape: Shape, depth_method: str = "block_importance") -> dict:
    """{"teacher_layers": the teacher layer behind each student layer, "hidden_channels": the
    teacher embedding channel behind each student channel} for a student of `shape`."""
    hidden = top_indices(importance.hidden, shape.hidden_size)
    return {"teacher_layers": [int(i) for i in select_layers(importance, shape.num_hidden_layers, depth_method)],
            "hidden_channels": [int(i) for i in hidden]}


def save_pruning_map(directory: str | Path, importance: Importance, shape: Shape,
                     depth_method: str = "block_importance") -> dict:
    recorded = pruning_map(importance, shape, depth_method)
    (Path(directory) / PRUNING_MAP).write_text(json.dumps(recorded) + "\n")
    return recorded


def copy_pruning_map(source_dir: str | Path, out: str | Path) -> None:
    """A pruned model's map, carried to a model made from it (its lineage, and the layer map a
    later distillation reads); nothing where the source has none (a teacher)."""
    if (Path(source_dir) / PRUNING_MAP).exists():
        shutil.copy2(Path(source_dir) / PRUNING_MAP, Path(out) / PRUNING_MAP)


def read_pruning_map(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / PRUNING_MAP
    return json.loads(path.read_text()) if path.exists() else None


def _check_request(model: PreTrainedModel, importance: Importance, shape: Shape) -> None:
    teacher = Shape.of(model.config)
    if importance.teacher_shape != teacher or importance.model_type != model.config.model_type:
        raise ValueError(
            f"importance scores were computed for a {importance.model_type} of shape "
            f"{importance.teacher_shape.as_dict()}, but the model is a {model.config.model_type} of "
            f"shape {teacher.as_dict()}; rescore this teacher (the score stage) before pruning"
        )
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(
            "the teacher is a quantized model (its config has quantization_config); its packed weights "
            "cannot be sliced: prune a dequantized float checkpoint (acquire converts GGUF teachers)"
        )
    problems = shape_problems(model.config, shape)
    if problems:
        raise ValueError("cannot prune to this shape:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------
# Choosing what to keep


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, ascending; ties go to the lower index."""
    ranked = torch.argsort(scores, descending=True, stable=True)[:count]
    return ranked.sort().values


def select_layers(importance: Importance, num_layers: int, method: str = "block_importance") -> list[int]:
    """The teacher layers a student of `num_layers` keeps, in order.

    - `block_importance`: drop the layers whose output is most like their input (1 - cosine);
    - `lm_loss`: drop the layers whose removal raises the LM loss least (needs `lm_loss_samples`);
    - `contiguous`: drop the contiguous run of layers with the least summed block importance
      (the second Minitron paper, 2408.11796, drops one contiguous block);
    - `last`: drop the final layers (a baseline).
    """
    total = importance.block.numel()
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_hidden_layers={num_layers} must be between 1 and the teacher's {total}")
    if method == "block_importance":
        return top_indices(importance.block, num_layers).tolist()
    if method == "lm_loss":
        return top_indices(_layer_loss(importance), num_layers).tolist()
    if method == "contiguous":
        return _without_least_important_run(importance.block, total - num_layers)
    if method == "last":
        return list(range(num_layers))
    raise ValueError(f"depth_method={method!r} is unknown; use one of {', '.join(DEPTH_METHODS)}")


def _layer_loss(importance: Importance) -> torch.Tensor:
    if importance.layer_loss is None:
        raise ValueError(
            "depth_method='lm_loss' needs LM-loss layer scores, but these were scored with "
            "lm_loss_samples=0; set scoring.lm_loss_samples > 0 and rescore, or pick another depth_method"
        )
    return importance.layer_loss


def _without_least_important_run(block: torch.Tensor, drop: int) -> list[int]:
    total = block.numel()
    if drop == 0:
        return list(range(total))
    run_sums = block.unfold(0, drop, 1).sum(dim=1)  # run_sums[s] = block[s:s + drop].sum()
    start = int(torch.argmin(run_sums))  # the first of equal minima
    return [index for index in range(total) if not start <= index < start + drop]


def select_heads(head_scores: torch.Tensor, teacher: Shape, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, key/value heads) one layer keeps, each ascending.

    Key/value group g serves query heads g*group .. (g+1)*group - 1 (transformers' repeat_kv),
    so keeping heads group by group, in order, keeps every query head with its key/value head.
    """
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    per_group = head_scores.view(teacher.num_key_value_heads, group)
    kv_heads = top_indices(per_group.sum(dim=1), shape.num_key_value_heads)
    heads_per_group = shape.num_attention_heads // shape.num_key_value_heads
    query_heads = [g * group + top_indices(per_group[g], heads_per_group) for g in kv_heads.tolist()]
    return torch.cat(query_heads), kv_heads


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of whole heads in a head-major projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _all_or(indices: torch.Tensor, total: int) -> torch.Tensor | None:
    # None (keep everything, slice nothing) when no unit is pruned, so such tensors stay bit-identical.
    return None if indices.numel() == total else indices


def global_keep(importance: Importance, shape: Shape) -> Keep:
    hidden = top_indices(importance.hidden, shape.hidden_size)
    return {"hidden": _all_or(hidden, importance.hidden.numel()), "vocab": None, "head_dim": None}


def layer_keep(importance: Importance, shape: Shape, layer: int, hidden: torch.Tensor | None) -> Keep:
    """What teacher layer `layer` keeps, on every axis of its tensors."""
    teacher = importance.teacher_shape
    query_heads, kv_heads = select_heads(importance.heads[layer], teacher, shape)
    query = head_channels(query_heads, teacher.head_dim)
    kv = head_channels(kv_heads, teacher.head_dim)
    mlp = top_indices(importance.mlp[layer], shape.intermediate_size)
    return {
        "hidden": hidden,
        "query": _all_or(query, teacher.num_attention_heads * teacher.head_dim),
        "kv": _all_or(kv, teacher.num_key_value_heads * teacher.head_dim),
        "mlp": _all_or(mlp, teacher.intermediate_size),
        "head_dim": None,
    }


# ---------------------------------------------------------------------------------------------
# Slicing the weights


def pruned_state_dict(model: PreTrainedModel, arch: Arch, importance: Importance, shape: Shape,
                      kept_layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """The student's tensors, named as in the student (layers renumbered from 0)."""
    teacher_state = model.state_dict()
    _check_table_covers(teacher_state, arch, model.config)
    sizes = unit_sizes(importance.teacher_shape, model.config.vocab_size)
    keep = global_keep(importance, shape)
    state = {name: slice_tensor(teacher_state[name], axes, keep, sizes, name)
             for name, axes in arch.global_tensors(model.config).items()}
    layer_tensors = arch.layer_tensors(model.config)
    for new_index, old_index in enumerate(kept_layers):
        keep_here = layer_keep(importance, shape, old_index, keep["hidden"])
        for name, axes in layer_tensors.items():
            source = arch.layer_prefix(old_index) + name
            state[arch.layer_prefix(new_index) + name] = slice_tensor(
                teacher_state[source], axes, keep_here, sizes, source)
    return state


def _check_table_covers(teacher_state: Mapping[str, torch.Tensor], arch: Arch, config) -> None:
    """Refuse a checkpoint with tensors the table does not describe: they could not be pruned."""
    described = set(arch.global_tensors(config))
    for index in range(config.num_hidden_layers):
        described |= {arch.layer_prefix(index) + name for name in arch.layer_tensors(config)}
    if is_tied(config):
        described.add(f"{arch.lm_head}.weight")
    unknown = sorted(set(teacher_state) - described)
    missing = sorted(described - set(teacher_state))
    if unknown or missing:
        raise ValueError(
            f"this {arch.model_type} model does not match minizoo's {arch.model_type} table "
            f"(unknown tensors: {unknown[:5]}, missing: {missing[:5]}); it may be a variant that "
            "builder/models/arch.py does not support yet"
        )


def slice_tensor(tensor: torch.Tensor, axes: Axes, keep: Keep, sizes: Mapping[str, int],
                 name: str = "tensor") -> torch.Tensor:
    """Keep the chosen units along every dimension; always a new tensor, never a view of the teacher."""
    expected = tuple(sizes[unit] for unit in axes)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} from the config")
    result = tensor
    for dim, unit in enumerate(axes):
        indices = keep.get(unit)
        if indices is not None:
            result = result.index_select(dim, indices.to(tensor.device))
    return result.clone() if result is tensor else result


# ---------------------------------------------------------------------------------------------
# The student model


def _build_student(teacher: PreTrainedModel, config, state: dict[str, torch.Tensor], arch: Arch,
                   kept_layers: Sequence[int]) -> PreTrainedModel:
    # Built on the meta device so no random initialisation is spent on weights about to be replaced.
    with torch.device("meta"):
        student = type(teacher)(config)
    result = student.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {f"{arch.lm_head}.weight"} if is_tied(config) else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed_missing:
        raise RuntimeError(f"pruned weights do not fit the student: {result}")
    if is_tied(config):
        student.tie_weights()
    _copy_buffers(teacher, student, arch, kept_layers)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train(teacher.training)


def _copy_buffers(teacher: nn.Module, student: nn.Module, arch: Arch, kept_layers: Sequence[int]) -> None:
    """Non-persistent buffers (rotary frequencies) are not in the state dict; they depend only on
    config fields pruning keeps (head_dim, RoPE), so the teacher's are the student's."""
    teacher_buffers = dict(teacher.named_buffers())
    for name, buffer in list(student.named_buffers()):
        if not buffer.is_meta:
            continue
        source = teacher_buffers[_teacher_name(name, arch, kept_layers)]
        if source.shape != buffer.shape:
            raise RuntimeError(f"buffer {name} has shape {tuple(source.shape)} in the teacher, "
                               f"{tuple(buffer.shape)} in the student")
        module_name, _, buffer_name = name.rpartition(".")
        # Replacing the entry in place keeps the buffer's persistence flag.
        student.get_submodule(module_name)._buffers[buffer_name] = source.clone()


def _teacher_name(student_name: str, arch: Arch, kept_layers: Sequence[int]) -> str:
    prefix = f"{arch.layers}."
    if not student_name.startswith(prefix):
        return student_name
    index, rest = student_name[len(prefix):].split(".", 1)
    return f"{prefix}{kept_layers[int(index)]}.{rest}"
