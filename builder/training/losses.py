"""Distillation losses on logits [tokens, vocab], computed chunk by chunk."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from builder.training.settings import Loss


# The loss sees logits [tokens, vocab]; with a 49152-wide vocab, 1024 tokens are 200 MB per
# fp32 copy. Chunks of this many tokens bound the loss's temporaries (log-softmaxes,
# probabilities) to a few chunk-sized copies; each chunk's gradient is taken right away
# (see _ChunkedLosses) instead of keeping its temporaries alive for backward.
LOSS_CHUNK_TOKENS = 256


def chunked_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kind: Loss = "forward_kl",
    temperature: float = 1.0,
    with_ce: bool = False,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence, cross-entropy) means over tokens, from logits [tokens, vocab].

    The divergence is per token, averaged over all tokens and scaled by T^2 (so gradients
    keep their size as T changes, Hinton et al.); the cross-entropy is averaged over the
    tokens whose label is not -100. A part that is not asked for is NaN.
    """
    return _ChunkedLosses.apply(student_logits, teacher_logits, labels, kind, temperature, with_ce, chunk_tokens)


class _ChunkedLosses(torch.autograd.Function):
    """The losses, and their gradients with respect to the student logits, chunk by chunk.

    Each chunk's gradient is taken in forward, while its temporaries (log-softmaxes,
    probabilities) are still alive, and written into one logits-sized buffer; backward only
    scales that buffer by the incoming gradient (the losses are scalars). So the loss runs
    forward once, no chunk-sized temporary outlives its chunk, and neither set of logits has
    to be kept for backward. Recomputing each chunk in backward instead (activation
    checkpointing) ran the loss forward twice and summed one zero-filled logits-sized gradient
    per chunk: with the division by T = 1 that is now skipped, about 18% of a CPU distillation
    step (SmolLM2-135M -> 90M student, 4 x 256 tokens, torch.profiler). forward_kl, the
    default, has its gradient written out; the other losses get theirs from autograd.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kind, temperature, with_ce, chunk_tokens):
        tokens, has_teacher = student_logits.shape[0], teacher_logits is not None
        wants_grad = ctx.needs_input_grad[0]
        ce_count = (labels != -100).sum().clamp(min=1)  # a tensor: no GPU sync
        # Each buffer holds d(mean loss) / d(logits); the scales turn chunk sums into means.
        div_grad = torch.empty_like(student_logits) if wants_grad and has_teacher else None
        ce_grad = torch.empty_like(student_logits) if wants_grad and with_ce else None
        scales = (temperature**2 / tokens, 1 / ce_count.float())
        div_sum = ce_sum = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, tokens, chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            student = student_logits[chunk].detach()
            teacher = teacher_logits[chunk].detach() if has_teacher else None
            grads = (None if div_grad is None else div_grad[chunk], None if ce_grad is None else ce_grad[chunk])
            if has_teacher and kind == "forward_kl":  # the default: a hand-written gradient
                div, grad = _forward_kl_sum_and_grad(student, teacher, temperature)
                if grads[0] is not None:
                    torch.mul(grad, scales[0], out=grads[0])
                ce = div.new_zeros(())
                if with_ce:
                    _, ce = _chunk_sums_and_grads(student, None, labels[chunk], kind, temperature,
                                                  True, (None, grads[1]), scales)  # fmt: skip
            else:
                div, ce = _chunk_sums_and_grads(student, teacher, labels[chunk], kind, temperature,
                                                with_ce, grads, scales)  # fmt: skip
            div_sum, ce_sum = div_sum + div, ce_sum + ce
        ctx.save_for_backward(div_grad, ce_grad)
        nan = student_logits.new_tensor(float("nan"), dtype=torch.float32)
        divergence = div_sum * temperature**2 / tokens if has_teacher else nan
        return divergence, ce_sum / ce_count if with_ce else nan

    @staticmethod
    def backward(ctx, div_output_grad, ce_output_grad):
        div_grad, ce_grad = ctx.saved_tensors
        grad = None
        if div_grad is not None:
            grad = div_grad * div_output_grad.to(div_grad.dtype)
        if ce_grad is not None:
            scaled = ce_grad * ce_output_grad.to(ce_grad.dtype)
            grad = scaled if grad is None else grad + scaled
        return grad, None, None, None, None, None, None


def _chunk_sums_and_grads(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    with_ce: bool,
    grads_out: tuple[torch.Tensor | None, torch.Tensor | None],
    scales: tuple[float, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's (divergence sum, cross-entropy sum), their scaled gradients (by autograd)
    written into `grads_out` where it holds a tensor."""
    div_out, ce_out = grads_out
    with torch.enable_grad():
        student = student.requires_grad_(div_out is not None or ce_out is not None)
        div, ce = _chunk_loss_sums(student, teacher, labels, kind, temperature, with_ce)
    if div_out is not None:  # keep the graph when the cross-entropy needs it next
        (grad,) = torch.autograd.grad(div, student, div.new_tensor(scales[0]), retain_graph=ce_out is not None)
        div_out.copy_(grad)
    if ce_out is not None:
        ce_out.copy_(torch.autograd.grad(ce, student, scales[1].to(ce.dtype))[0])
    return div.detach(), ce.detach()


def _chunk_loss_sums(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    with_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # One log-softmax per model per chunk, in fp32 whatever the logits' dtype.
    div = ce = student.new_zeros((), dtype=torch.float32)
    log_p = None
    if teacher is not None or temperature == 1:
        log_p = F.log_softmax(_softened(student, temperature), dim=-1)
    if teacher is not None:
        log_q = F.log_softmax(_softened(teacher, temperature), dim=-1)
        div = divergence_sum(log_p, log_q, kind)
    if with_ce:
        log_p1 = log_p if temperature == 1 else F.log_softmax(student.float(), dim=-1)
        ce = F.nll_loss(log_p1, labels, ignore_index=-100, reduction="sum")
    return div, ce


def _forward_kl_sum_and_grad(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) summed over a chunk, and its gradient with respect to `student`.

    The gradient is (softmax(s/T) - softmax(t/T)) / T per token: written out, it takes one
    exp per model, where autograd through kl_div and log_softmax made three more passes over
    the chunk (about a third of the loss's time on a CPU).
    """
    log_p = F.log_softmax(_softened(student, temperature), dim=-1)
    log_q = F.log_softmax(_softened(teacher, temperature), dim=-1)
    q = log_q.exp()
    div = torch.sub(log_q, log_p).mul_(q).sum()  # what kl_div(log_target=True, "sum") computes
    grad = log_p.exp_().sub_(q)  # p - q, in log_p's memory
    return div, grad if temperature == 1 else grad.div_(temperature)


def _softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # Dividing by 1 is exact but still copies a chunk: skip it (and .float() of fp32 is free).
    return logits.float() if temperature == 1 else logits.float() / temperature


def divergence_sum(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed divergence between student log-probs `log_p` and teacher log-probs `log_q`."""
    if kind == "forward_kl":  # KL(teacher || student): mass-covering, the Minitron choice
        return F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    if kind == "reverse_kl":  # KL(student || teacher): mode-seeking
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    if kind == "jsd":  # 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)
        return 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="sum")
                      + F.kl_div(log_m, log_q, log_target=True, reduction="sum"))  # fmt: skip
    raise ValueError(f"loss={kind!r} is not a divergence; use forward_kl, reverse_kl or jsd")
