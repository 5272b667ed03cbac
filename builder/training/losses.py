"""Distillation losses on logits [tokens, vocab], computed chunk by chunk, against the
teacher's full logits or its stored top-k signal (`TopKTarget`).

A stored signal is the teacher's k most likely ids with their log-probabilities, the log of
the mass of every other id (the tail), and optionally `tail_ids`: m ids drawn from the
teacher's own distribution within the tail. Without them, forward KL sees the tail as one
bin and spreads its mass over the student's tail in the student's own proportions, so the
student never learns the teacher's shape there (a bias: in bench/results/teach.json the
students of top-64 without draws end +0.029 +- 0.004 nats of held-out loss behind online
ones, those of top-16 with 16 draws +0.006 +- 0.002). With them, each drawn id carries
tail mass / m, which makes the target an unbiased estimate of the teacher's full distribution
and forward KL's gradient an unbiased estimate of the full-vocabulary gradient (the
random-sampling KD of Anshumann et al. 2025, "Sparse Logit Sampling", here on top of the
exact top k). Reverse KL and JSD weigh every id by the student's probability and need the
teacher's at ids the samples may miss: they use the (k+1)-bin form.

Adding a distillation loss:
1. its name in `Loss` and `LOSSES` (builder/training/settings.py) and in `DistillSpec.loss`
   (builder/spec/schema.py); regenerate families/spec.schema.json (`build-family schema`);
2. its per-chunk sum in `divergence_sum(log_p, log_q, kind)` here, from the student's and the
   teacher's log-probabilities: the same function serves full logits and a stored signal's
   (k+1) bins (`coarse_log_probs`), and autograd gives its gradient (`_chunk_sums_and_grads`;
   only forward_kl has a written-out one);
3. its teacher signal: DistillSpec's validators keep every loss but forward_kl online unless
   `teacher_signal: topk` is asked for, and give it no tail draws; a loss that uses the draws
   needs its own sampled form (as `_sampled_forward_kl_sum_and_grad`) and those validators
   changed;
4. tests: the per-token reference in tests/test_distill.py (`per_token`, the parametrized
   kinds) and `KINDS` in tests/test_topk_losses.py, which check it against a plain
   computation in value and gradient, and its (k+1)-bin form against the full one.
A new loss changes no existing stage's output, so no stage version is bumped; changing an
existing divergence's values bumps `distill` (cross-entropy's: `correct` too), by the rule in
builder/stages/__init__.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from builder.teaching.target import LOSS_CHUNK_TOKENS, TopKTarget, softened
from builder.training.settings import Loss


# A log-probability this low is an empty bin: exp() of it is exactly 0 in fp32 and fp64 (both
# underflow far above it), yet it is finite, so an empty bin (the tail when k == vocab) adds
# exactly 0 to every divergence and to its gradient, where -inf would make 0 * inf = NaN.
EMPTY_LOG_PROB = -1e4


def chunked_losses(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKTarget | None,
    labels: torch.Tensor,
    kind: Loss = "forward_kl",
    temperature: float = 1.0,
    with_ce: bool = False,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence, cross-entropy) means over tokens, from logits [tokens, vocab].

    `teacher` is the teacher's logits [tokens, vocab] or its stored top-k signal (`TopKTarget`,
    already at `temperature`); with the latter the divergence is taken between the two
    distributions coarsened to k+1 bins (see `coarse_log_probs`).

    The divergence is per token, averaged over all tokens and scaled by T^2 (so gradients
    keep their size as T changes, Hinton et al.); the cross-entropy is averaged over the
    tokens whose label is not -100. A part that is not asked for is NaN.
    """
    return _ChunkedLosses.apply(student_logits, teacher, labels, kind, temperature, with_ce, chunk_tokens)


class _ChunkedLosses(torch.autograd.Function):
    """The losses, and their gradients with respect to the student logits, chunk by chunk.

    Each chunk's gradient is taken in forward, while its temporaries (log-softmaxes,
    probabilities) are still alive, and written into one logits-sized buffer; backward only
    scales that buffer by the incoming gradient (the losses are scalars). So the loss runs
    forward once, no chunk-sized temporary outlives its chunk, and neither set of logits has
    to be kept for backward. Recomputing each chunk in backward instead (activation
    checkpointing) would run the loss forward twice and sum one zero-filled logits-sized
    gradient per chunk. forward_kl, the default, has its gradient written out (against full
    logits or a top-k target); the other losses get theirs from autograd.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kind, temperature, with_ce, chunk_tokens):
        tokens, has_teacher = student_logits.shape[0], teacher_logits is not None
        stored = isinstance(teacher_logits, TopKTarget)
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
            teacher = teacher_logits[chunk] if has_teacher else None  # a TopKTarget slices rows too
            teacher = teacher if stored or teacher is None else teacher.detach()
            grads = (None if div_grad is None else div_grad[chunk], None if ce_grad is None else ce_grad[chunk])
            if has_teacher and kind == "forward_kl":  # the default: a hand-written gradient
                div, grad = _forward_kl_for(teacher)(student, teacher, temperature)
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
    teacher: torch.Tensor | TopKTarget | None,
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
    teacher: torch.Tensor | TopKTarget | None,
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    with_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # One log-softmax per model per chunk, in fp32 whatever the logits' dtype.
    div = ce = student.new_zeros((), dtype=torch.float32)
    log_p = None
    if teacher is not None or temperature == 1:
        log_p = F.log_softmax(softened(student, temperature), dim=-1)
    if isinstance(teacher, TopKTarget):
        div = divergence_sum(*coarse_log_probs(log_p, teacher), kind)
    elif teacher is not None:
        log_q = F.log_softmax(softened(teacher, temperature), dim=-1)
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
    exp per model, where autograd through kl_div and log_softmax makes three more passes over
    the chunk.
    """
    log_p = F.log_softmax(softened(student, temperature), dim=-1)
    log_q = F.log_softmax(softened(teacher, temperature), dim=-1)
    q = log_q.exp()
    div = torch.sub(log_q, log_p).mul_(q).sum()  # what kl_div(log_target=True, "sum") computes
    grad = log_p.exp_().sub_(q)  # p - q, in log_p's memory
    return div, grad if temperature == 1 else grad.div_(temperature)


def _forward_kl_for(teacher: torch.Tensor | TopKTarget):
    if not isinstance(teacher, TopKTarget):
        return _forward_kl_sum_and_grad
    return _sampled_forward_kl_sum_and_grad if teacher.tail_samples else _stored_forward_kl_sum_and_grad


def coarse_log_probs(log_p: torch.Tensor, target: TopKTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities [tokens, k+1] over the k+1 bins of a top-k target:
    the teacher's k stored ids, then one tail bin for every other id.

    A divergence between these is the divergence between the (k+1)-bin coarsenings of both
    distributions: a proper divergence (>= 0, 0 when they agree), exactly the full-vocabulary
    one when k == vocab, and below it otherwise by the tail term of the chain rule of KL
    (full = coarse + tail mass * KL between the two distributions within the tail). Giving the
    student's whole tail one bin, instead of dropping it, is what keeps the loss a divergence:
    a student that only matched the top-k ids' relative sizes would otherwise score 0.
    `log_p` is the student's log-softmax at the target's temperature, [tokens, vocab].
    """
    return _student_bins(log_p, target.indices), _teacher_bins(target, log_p.dtype)


def _student_bins(log_p: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    # log p_tail is a log-sum-exp over the ids outside the top k (not log1p(-sum), which
    # cancels). The top-k ids are pushed EMPTY_LOG_PROB below the row's smallest log-prob
    # rather than to -inf: they then add exactly 0 to the sum, and when the tail is empty
    # (k == vocab) it is a finite, zero-mass bin whose log-sum-exp gradient is finite (an
    # all -inf log-sum-exp has a NaN gradient).
    floor = (log_p.detach().amin(-1, keepdim=True) + EMPTY_LOG_PROB).expand_as(indices)
    tail = log_p.scatter(-1, indices, floor).logsumexp(-1, keepdim=True)
    return torch.cat([log_p.gather(-1, indices), tail], dim=-1)


def _teacher_bins(target: TopKTarget, dtype: torch.dtype) -> torch.Tensor:
    bins = torch.cat([target.logprobs.to(dtype), target.tail_logprob.to(dtype).unsqueeze(-1)], dim=-1)
    bins = bins.clamp_min(EMPTY_LOG_PROB)  # a -inf tail (k == vocab) becomes a finite empty bin
    # Stored in fp16, each log-prob is rounded by up to 2^-11 of itself, so the bins no longer
    # sum to 1 and a KL could come out negative; renormalized over the k+1 bins it cannot.
    return bins - bins.logsumexp(-1, keepdim=True)


def _stored_forward_kl_sum_and_grad(
    student: torch.Tensor, target: TopKTarget, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) between the (k+1)-bin coarsenings, summed over a chunk, and its
    gradient with respect to `student`.

    The gradient is (softmax(s/T) - q~) / T per token, where q~ is the teacher's mass as the
    loss sees it: its stored probability at each top-k id, and its tail mass spread over the
    other ids in proportion to the student's own probabilities there (q_tail * p_v / p_tail).
    Written out, like the full-logits one: autograd through the bins would add passes over
    the chunk for the gather, scatter and log-sum-exp of the bins.
    """
    log_p = F.log_softmax(softened(student, temperature), dim=-1)
    log_p_bins, log_q_bins = coarse_log_probs(log_p, target)
    q = log_q_bins.exp()
    div = torch.sub(log_q_bins, log_p_bins).mul_(q).sum()  # what kl_div(log_target=True, "sum") computes
    # log q~ = log p_v + log(q_tail / p_tail), in log space so a tiny p_tail cannot overflow;
    # at the top-k ids it can be anything (with k == vocab the empty tail bins make it large)
    # but those are overwritten with the teacher's stored probabilities.
    grad = log_p.exp()
    spread = log_p.add_(log_q_bins[:, -1:] - log_p_bins[:, -1:]).exp_()  # in log_p's memory
    spread.scatter_(-1, target.indices, q[:, :-1])
    grad.sub_(spread)
    return div, grad if temperature == 1 else grad.div_(temperature)


def _sampled_forward_kl_sum_and_grad(
    student: torch.Tensor, target: TopKTarget, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q^ || student) summed over a chunk, and its gradient with respect to `student`, where
    q^ is the stored signal's estimate of the teacher: its probability at each top-k id, and
    its tail mass split evenly over the m drawn tail ids (an id drawn c times gets c / m of it).

    q^ is a distribution (it sums to the teacher's mass) and the loss a proper divergence from
    it. Each drawn id is the teacher's tail distribution's in expectation, so E[q^] is the
    teacher's full distribution and the gradient, (softmax(s/T) - q^) / T per token, is an
    unbiased estimate of the full-vocabulary forward KL's (tests/test_topk_losses.py averages
    it over draws). Written out like the others.
    """
    log_p = F.log_softmax(softened(student, temperature), dim=-1)
    log_q_bins = _teacher_bins(target, log_p.dtype)  # the top k, then the tail: renormalized
    log_head, log_tail = log_q_bins[:, :-1], log_q_bins[:, -1:]
    drawn = target.tail_ids
    log_share = log_tail - math.log(drawn.shape[-1])  # each draw's mass, [T, 1]
    repeats = (drawn.unsqueeze(-1) == drawn.unsqueeze(-2)).sum(-1)  # how often each draw's id was drawn
    log_q_drawn = log_share + repeats.to(log_p.dtype).log()  # q^ at each draw's id
    head_div = torch.sub(log_head, log_p.gather(-1, target.indices)).mul_(log_head.exp()).sum()
    # Each draw adds its own share of its id's term: summed over an id's c draws, c/m of the
    # tail times (log q^ - log p) at that id, which is q^ (log q^ - log p) once.
    drawn_div = torch.sub(log_q_drawn, log_p.gather(-1, drawn)).mul_(log_share.exp()).sum()
    grad = log_p.exp_()  # p, in log_p's memory
    grad.scatter_add_(-1, target.indices, log_head.exp().neg_())
    grad.scatter_add_(-1, drawn, log_share.exp().neg_().expand_as(drawn))  # repeats add up
    return head_div + drawn_div, grad if temperature == 1 else grad.div_(temperature)


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
