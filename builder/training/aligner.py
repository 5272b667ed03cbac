"""The intermediate-state loss: a student wrapper that also returns projected hidden states."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F


class HiddenStateAligner(torch.nn.Module):
    """The student plus a learned linear map from its hidden states to the teacher's.

    The first Minitron paper (2407.14679, section 3) adds to the logit loss a loss between
    intermediate states, with a linear projection when the widths differ, and found it helps
    only after heavy depth pruning; ModelOpt's version is a cosine loss on hidden states
    (HiddenStateCosineLoss). Here each student layer's output is compared with the output of
    the teacher layer it was pruned from (`pruning_map["teacher_layers"]`, written by
    `builder.pruning.cuts`). The projection starts as the pruning's own channel selection (student
    channel i -> the teacher channel it was cut from), so at step 0 it adds nothing the pruning
    did not; it trains with the student and is dropped when the student is saved.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, pruning_map: dict | None):
        super().__init__()
        self.student = student
        student_width, teacher_width = student.config.hidden_size, teacher.config.hidden_size
        self.teacher_layer_indices = _teacher_layer_indices(pruning_map, student.config.num_hidden_layers,
                                                            teacher.config.num_hidden_layers)
        self.projection = torch.nn.Linear(student_width, teacher_width, bias=False)
        channels = (pruning_map or {}).get("hidden_channels")
        if channels is None and student_width == teacher_width:
            channels = list(range(teacher_width))
        if channels is not None:
            with torch.no_grad():
                self.projection.weight.zero_()
                self.projection.weight[torch.tensor(channels), torch.arange(student_width)] = 1.0

    def teacher_layers(self, teacher: torch.nn.Module) -> list[torch.nn.Module]:
        return [teacher.model.layers[i] for i in self.teacher_layer_indices]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with recording(list(self.student.model.layers)) as hidden:
            logits = self.student(input_ids=input_ids, use_cache=False).logits
        return logits, [self.projection(h) for h in hidden]


def _teacher_layer_indices(pruning_map: dict | None, student_layers: int, teacher_layers: int) -> list[int]:
    if pruning_map and pruning_map.get("teacher_layers") is not None:
        return list(pruning_map["teacher_layers"])
    # No record of the pruning: spread the student's layers evenly over the teacher's.
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


@contextlib.contextmanager
def recording(layers: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collects each layer's output (the residual stream after it) during the block."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def hidden_state_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layer pairs and tokens of 1 - cosine(projected student state, teacher state)."""
    if len(student_hidden) != len(teacher_hidden):
        raise RuntimeError(f"recorded {len(student_hidden)} student and {len(teacher_hidden)} teacher states")
    distances = [1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean()
                 for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(distances).mean()
