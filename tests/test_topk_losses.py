"""The distillation losses against a stored top-k teacher signal (TopKTarget): equal to the
full-vocabulary losses at k == vocab, a proper divergence below them otherwise; with draws
from the teacher's tail, forward KL's gradient is the full one's in expectation.

Run: tests/loopback_only.sh .venv/bin/python -m pytest -q tests/test_topk_losses.py   (seconds)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from builder.teaching.target import TopKTarget, topk_target
from builder.training.losses import chunked_losses, coarse_log_probs, divergence_sum
from tiny_models import one_thread  # noqa: F401 (autouse fixture)

TOKENS, VOCAB = 37, 50
KINDS = ["forward_kl", "reverse_kl", "jsd"]
SEEDS = [0, 1, 2]
FP32_EPS = 2.0**-24  # fp32's unit roundoff
# The gradient comes back in the logits' dtype: rounding an fp32 gradient to bf16 moves it by up
# to half a bf16 ulp (2^-8 of it); two nearly equal fp32 gradients can round one ulp (2^-7) apart.
BF16_ROUNDING, BF16_ULP = 2.0**-8, 2.0**-7


def random_logits(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits [TOKENS, VOCAB], spread like a trained model's (std 3)."""
    generator = torch.Generator().manual_seed(seed)
    student, teacher = (torch.randn(TOKENS, VOCAB, generator=generator).mul(3) for _ in range(2))
    return student.to(dtype), teacher


def divergence(student, teacher, kind, temperature=1.0) -> torch.Tensor:
    labels = torch.zeros(student.shape[0], dtype=torch.long)  # unused: no cross-entropy asked for
    return chunked_losses(student, teacher, labels, kind, temperature)[0]


def divergence_and_grad(student, teacher, kind, temperature, chunk_tokens=256) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.detach().clone().requires_grad_()
    labels = torch.zeros(student.shape[0], dtype=torch.long)
    div, _ = chunked_losses(student, teacher, labels, kind, temperature, chunk_tokens=chunk_tokens)
    (grad,) = torch.autograd.grad(div, student)
    return div, grad


def per_token_divergence(student, teacher, kind, temperature) -> torch.Tensor:
    rows = (slice(i, i + 1) for i in range(student.shape[0]))
    return torch.stack([divergence(student[row], teacher[row], kind, temperature) for row in rows])


# ----------------------------------------------------------------------------------------
# topk_target: what the teach pass stores


@pytest.mark.parametrize("top_k", [1, 7, VOCAB])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_target_matches_a_float64_reference(top_k, temperature):
    _, teacher = random_logits(0)
    target = topk_target(teacher, top_k, temperature)
    log_q = F.log_softmax(teacher.double() / temperature, dim=-1)
    ref_values, ref_indices = log_q.topk(top_k, dim=-1)
    assert target.top_k == top_k and target.indices.dtype == torch.int64
    assert torch.equal(target.indices, ref_indices)
    # An fp32 log-softmax of values of magnitude <= ~30 is off by a few ulps of 30 (~2e-6).
    torch.testing.assert_close(target.logprobs.double(), ref_values, rtol=0, atol=1e-5)
    if top_k == VOCAB:
        assert torch.all(target.tail_logprob == float("-inf"))
    else:  # in float64, log1p(-sum) is accurate enough for these unpeaked distributions
        ref_tail = torch.log1p(-ref_values.exp().sum(-1))
        torch.testing.assert_close(target.tail_logprob.double(), ref_tail, rtol=0, atol=1e-5)
    # The k+1 bins hold all the mass: up to fp32 rounding of a sum of VOCAB terms.
    total = torch.cat([target.logprobs, target.tail_logprob.unsqueeze(-1)], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(TOKENS), rtol=0, atol=VOCAB * FP32_EPS)


def test_topk_target_applies_the_temperature_and_chunking_does_not_change_it():
    _, teacher = random_logits(1)
    hot, cold = topk_target(teacher, 5, 2.0), topk_target(teacher, 5, 1.0)
    assert not torch.allclose(hot.logprobs, cold.logprobs)  # a softer teacher: flatter top k
    assert torch.all(hot.logprobs[:, 0] < cold.logprobs[:, 0])
    chunked = topk_target(teacher, 5, 2.0, chunk_tokens=7)
    for name in ("indices", "logprobs", "tail_logprob"):
        assert torch.equal(getattr(chunked, name), getattr(hot, name)), name


def test_tail_is_accurate_when_the_top_k_hold_nearly_all_the_mass():
    # The top id holds all but ~2e-12 of the mass: 1 - sum cancels to 0 in fp32.
    teacher = torch.zeros(1, VOCAB)
    teacher[0, 0] = 30.0
    target = topk_target(teacher, 1)
    expected = math.log(VOCAB - 1) - math.log(math.exp(30.0) + VOCAB - 1)
    assert target.tail_logprob.item() == pytest.approx(expected, rel=1e-6)
    assert torch.log1p(-target.logprobs.exp().sum()).item() == float("-inf")  # what the naive way gives


@pytest.mark.parametrize("top_k", [0, VOCAB + 1])
def test_a_top_k_outside_the_vocabulary_is_refused(top_k):
    with pytest.raises(ValueError, match=f"top_k={top_k}"):
        topk_target(torch.zeros(2, VOCAB), top_k)


def test_a_target_slices_by_rows():
    target = topk_target(random_logits(0)[1], 4)
    part = target[3:9]
    assert part.top_k == 4 and part.indices.shape == (6, 4) and part.tail_logprob.shape == (6,)
    assert torch.equal(part.logprobs, target.logprobs[3:9])


# ----------------------------------------------------------------------------------------
# k == vocab: exactly the full-vocabulary losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_full_k_equals_the_full_vocabulary_loss_and_gradient(kind, dtype, temperature, seed):
    student, teacher = random_logits(seed, dtype)
    full, full_grad = divergence_and_grad(student, teacher, kind, temperature)
    top, top_grad = divergence_and_grad(student, topk_target(teacher, VOCAB, temperature), kind, temperature)
    # The paths differ only by fp32 rounding: the stored log-probs are renormalized over the
    # k+1 bins, a shift by the rounding of a log-sum-exp over VOCAB terms (<= VOCAB ulps), which
    # moves each token's divergence by as much (times T^2) and each gradient entry by that
    # fraction of a probability (<= 1), over T, over the tokens of the mean.
    shift = VOCAB * FP32_EPS
    torch.testing.assert_close(top, full, rtol=0, atol=shift * temperature**2)
    grad_rtol = BF16_ULP if dtype == torch.bfloat16 else 0
    torch.testing.assert_close(top_grad, full_grad, rtol=grad_rtol, atol=shift / temperature / TOKENS)
    assert top_grad.dtype == dtype and torch.isfinite(top_grad).all()


# ----------------------------------------------------------------------------------------
# k < vocab: a proper divergence, below the full one by the tail term


def coarse(student, teacher, top_k, kind, temperature) -> torch.Tensor:
    return divergence(student, topk_target(teacher, top_k, temperature), kind, temperature)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 5, 25, VOCAB - 1])
@pytest.mark.parametrize("seed", SEEDS)
def test_coarse_divergence_lies_between_zero_and_the_full_one_per_token(kind, top_k, seed):
    student, teacher = random_logits(seed)
    target = topk_target(teacher, top_k, 2.0)
    coarse_rows = per_token_divergence(student, target, kind, 2.0)
    full_rows = per_token_divergence(student, teacher, kind, 2.0)
    # Slack: fp32 rounding of a per-token sum over VOCAB terms, each no larger than the divergence.
    slack = VOCAB * FP32_EPS * 4.0 * full_rows.clamp(min=1)
    assert torch.all(coarse_rows >= -slack)
    assert torch.all(coarse_rows <= full_rows + slack)
    assert torch.all(coarse_rows > 0)  # random logits disagree on the coarse bins too


def tail_conditional_term(student, teacher, indices, temperature, kind) -> torch.Tensor:
    """Mean over tokens of r * KL(a's tail distribution || b's), in float64: the chain rule of
    KL's remainder (a = teacher, r = its tail mass for forward KL; a = student for reverse)."""
    p, q = (F.softmax(x.double() / temperature, dim=-1) for x in (student, teacher))
    a, b = (q, p) if kind == "forward_kl" else (p, q)
    outside = torch.ones_like(a, dtype=torch.bool).scatter(-1, indices, False)
    a_tail, b_tail = (torch.where(outside, x, 0.0) for x in (a, b))
    r, r_b = a_tail.sum(-1, keepdim=True), b_tail.sum(-1, keepdim=True)
    within = torch.where(outside, (a_tail / r) * ((a_tail / r).log() - (b_tail / r_b).log()), 0.0)
    return (r.squeeze(-1) * within.sum(-1)).mean() * temperature**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("top_k", [1, 5, 25, VOCAB - 1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_full_kl_is_coarse_kl_plus_the_tail_term_of_the_chain_rule(kind, top_k, temperature, seed):
    student, teacher = random_logits(seed)
    target = topk_target(teacher, top_k, temperature)
    full = divergence(student, teacher, kind, temperature).double()
    coarse_kl = divergence(student, target, kind, temperature).double()
    expected = tail_conditional_term(student, teacher, target.indices, temperature, kind)
    # Both fp32 losses are means of per-token sums over VOCAB terms whose sizes are bounded by
    # the divergence itself: each is off by about VOCAB ulps of it.
    tolerance = 2 * VOCAB * FP32_EPS * full.item()
    torch.testing.assert_close(full - coarse_kl, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_coarse_divergence_grows_with_k_up_to_the_full_one(kind, seed):
    # The top-(k+1) partition refines the top-k one, and a finer partition never lowers an
    # f-divergence (KL both ways, and JSD, are f-divergences): the gap to full only shrinks.
    student, teacher = random_logits(seed)
    values = torch.stack([coarse(student, teacher, k, kind, 1.0) for k in range(1, VOCAB + 1)])
    full = divergence(student, teacher, kind)
    slack = VOCAB * FP32_EPS * full  # fp32 rounding of two nearly equal sums over VOCAB terms
    assert torch.all(values[1:] >= values[:-1] - slack)
    assert values[0] < full - 0.1  # k = 1 leaves a real gap, so the check above has something to see
    torch.testing.assert_close(values[-1], full, rtol=0, atol=slack)


# ----------------------------------------------------------------------------------------
# Gradients, chunking, cross-entropy, fp16 storage


def naive_coarse_divergence(student, teacher, top_k, kind, temperature) -> torch.Tensor:
    """The same loss written plainly in float64: probabilities summed into k+1 bins by a mask."""
    p, q = (F.softmax(x.double() / temperature, dim=-1) for x in (student, teacher))
    top = q.topk(top_k, dim=-1).indices
    outside = torch.ones_like(q, dtype=torch.bool).scatter(-1, top, False)
    p, q = (torch.cat([x.gather(-1, top), torch.where(outside, x, 0.0).sum(-1, keepdim=True)], -1) for x in (p, q))
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    m = (p + q) / 2
    per_token = {"forward_kl": kl(q, p), "reverse_kl": kl(p, q), "jsd": 0.5 * kl(p, m) + 0.5 * kl(q, m)}
    return per_token[kind].mean() * temperature**2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 5, VOCAB - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_a_plain_float64_reference(kind, top_k, dtype):
    student, teacher = random_logits(3, dtype)
    div, grad = divergence_and_grad(student, topk_target(teacher, top_k, 2.0), kind, 2.0, chunk_tokens=7)
    ref_student = student.double().requires_grad_()
    ref = naive_coarse_divergence(ref_student, teacher, top_k, kind, 2.0)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    # fp32 against float64: up to VOCAB ulps of each per-token sum over VOCAB terms, and for
    # each gradient entry (a difference of probabilities over T and the tokens of the mean)
    # VOCAB ulps of 1 over the tokens; plus the bf16 gradient's own rounding.
    torch.testing.assert_close(div.double(), ref.detach(), rtol=VOCAB * FP32_EPS, atol=0)
    grad_rtol = BF16_ROUNDING if dtype == torch.bfloat16 else 0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=VOCAB * FP32_EPS / TOKENS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [3, 10])
def test_the_coarse_divergence_passes_gradcheck(kind, top_k):
    # k == vocab (10 here) checks that the empty tail bin has a finite, correct gradient.
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(4, 10, generator=generator, dtype=torch.float64).mul(2).requires_grad_()
    target = topk_target(torch.randn(4, 10, generator=generator).mul(2), top_k, 2.0)
    loss = lambda s: divergence_sum(*coarse_log_probs(F.log_softmax(s / 2.0, dim=-1), target), kind)  # noqa: E731
    assert torch.autograd.gradcheck(loss, (student,))


@pytest.mark.parametrize("top_k", [1, 5, VOCAB])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_written_out_forward_kl_gradient_equals_autograd_through_the_bins(top_k, temperature):
    student, teacher = random_logits(7)
    target = topk_target(teacher, top_k, temperature)
    # In the first rows the student puts all but e^-150 of its mass on the teacher's top k: a
    # tail that underflows fp32 (below e^-104), which the written-out gradient must survive.
    student[:4].scatter_(-1, target.indices[:4], 150.0 * temperature)
    div, grad = divergence_and_grad(student, target, "forward_kl", temperature)
    ref_student = student.clone().requires_grad_()
    log_p = F.log_softmax(ref_student / temperature, dim=-1)
    ref = divergence_sum(*coarse_log_probs(log_p, target), "forward_kl") * temperature**2 / TOKENS
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    assert torch.isfinite(grad).all()
    # The same fp32 quantities, formed in another order: a few ulps of the per-token sums
    # (VOCAB terms). Each gradient entry is T (p - q~) / TOKENS with |p - q~| <= 1, and a log-
    # softmax of softened logits of size x is off by ulps of x: each p by that much relatively.
    torch.testing.assert_close(div, ref, rtol=VOCAB * FP32_EPS, atol=0)
    log_p_error = 2 * FP32_EPS * (student / temperature).abs().max().clamp(min=1).item()
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=log_p_error * temperature / TOKENS)


@pytest.mark.parametrize("kind", KINDS)
def test_chunking_does_not_change_the_loss_or_its_gradient(kind):
    student, teacher = random_logits(4)
    target = topk_target(teacher, 6, 2.0)
    small, small_grad = divergence_and_grad(student, target, kind, 2.0, chunk_tokens=7)
    whole, whole_grad = divergence_and_grad(student, target, kind, 2.0, chunk_tokens=1000)
    # Only the order of the per-chunk sums differs: rounding of a sum of TOKENS terms.
    torch.testing.assert_close(small, whole, rtol=TOKENS * FP32_EPS, atol=0)
    torch.testing.assert_close(small_grad, whole_grad, rtol=4 * FP32_EPS, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cross_entropy_with_a_top_k_target_uses_only_labels_and_student(temperature):
    student, teacher = random_logits(6)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(6))
    labels[-3:] = -100
    target = topk_target(teacher, 4, temperature)
    student = student.requires_grad_()
    div, ce = chunked_losses(student, target, labels, "forward_kl", temperature, with_ce=True, chunk_tokens=7)
    (ce_grad,) = torch.autograd.grad(ce, student, retain_graph=True)
    ref_student = student.detach().clone().requires_grad_()
    ref_ce = F.cross_entropy(ref_student, labels, ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref_ce, ref_student)
    # Same fp32 log-softmax and mean, in another order: a few ulps of each.
    torch.testing.assert_close(ce, ref_ce, rtol=8 * FP32_EPS, atol=0)
    torch.testing.assert_close(ce_grad, ref_grad, rtol=8 * FP32_EPS, atol=FP32_EPS / TOKENS)
    torch.testing.assert_close(div, coarse(student.detach(), teacher, 4, "forward_kl", temperature))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_a_signal_stored_in_fp16_stays_within_its_rounding_bound(kind, temperature, seed):
    student, teacher = random_logits(seed)
    exact = topk_target(teacher, 8, temperature)
    stored = TopKTarget(exact.indices, exact.logprobs.half(), exact.tail_logprob.half())  # what the storage keeps
    loss32 = divergence(student, exact, kind, temperature)
    loss16 = divergence(student, stored, kind, temperature)
    # fp16 rounds each log-prob by <= 2^-11 of itself: d <= 2^-11 * 20 ~ 0.01 for the <= ~20
    # magnitudes a teacher's top k and tail have (asserted). After renormalization each
    # teacher bin moves by <= 2d in log space, so q' - q <= q (e^(2d) - 1). Forward KL then
    # moves by <= sum (q' - q) |log q - log p| + sum q' |log q' - log q|
    #        <= (e^(2d) - 1) sum q |log q - log p| + 2d per token (times T^2); reverse KL by <= 2d;
    # JSD, whose slope in q_b is 1/2 log(2 q_b / m_b), by less than forward KL's bound.
    magnitude = torch.cat([exact.logprobs, exact.tail_logprob.unsqueeze(-1)], -1).abs().max()
    assert magnitude <= 20
    d = 2.0**-11 * magnitude
    log_p, log_q = coarse_log_probs(F.log_softmax(student / temperature, dim=-1), exact)
    spread = (log_q.exp() * (log_q - log_p).abs()).sum(-1)
    bound = ((torch.exp(2 * d) - 1) * spread + 2 * d).mean() * temperature**2
    assert abs(loss16 - loss32) <= bound
    assert loss16 >= 0 and loss16 != loss32  # the rounding is real, and the renormalization keeps it a divergence


# ----------------------------------------------------------------------------------------
# Draws from the tail: forward KL against the sampled estimate of the teacher


def drawn_target(teacher, top_k, temperature, draws, seed) -> TopKTarget:
    return topk_target(teacher, top_k, temperature, draws, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_draws_lie_in_the_tail_and_are_repeatable(temperature):
    _, teacher = random_logits(3)
    target = drawn_target(teacher, 5, temperature, 16, seed=0)
    assert target.tail_ids.shape == (TOKENS, 16) and target.tail_samples == 16
    assert not (target.tail_ids.unsqueeze(-1) == target.indices.unsqueeze(-2)).any()
    assert torch.equal(target.tail_ids, drawn_target(teacher, 5, temperature, 16, seed=0).tail_ids)
    assert not torch.equal(target.tail_ids, drawn_target(teacher, 5, temperature, 16, seed=1).tail_ids)
    assert torch.equal(target[3:9].tail_ids, target.tail_ids[3:9])


def test_each_id_is_drawn_its_expected_count_rounded_down_or_up():
    """Systematic draws: an id holding a share pi of the tail is drawn m pi times, rounded one
    way or the other, never scattered as independent draws would be (Binomial(m, pi))."""
    _, teacher = random_logits(9)
    draws = 16
    target = drawn_target(teacher, 5, 1.0, draws, seed=0)
    tail = F.softmax(teacher.double(), dim=-1).scatter(-1, target.indices, 0.0)
    expected = draws * tail / tail.sum(-1, keepdim=True)
    counts = torch.zeros_like(expected).scatter_add_(-1, target.tail_ids, torch.ones_like(target.tail_ids, dtype=expected.dtype))
    assert (counts - expected).abs().lt(1 + 1e-9).all()  # the 1e-9: float64 rounding of m pi at an integer


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_draws_the_forward_kl_gradient_is_unbiased_and_without_them_it_is_not(temperature):
    """The mean gradient over many draws is the full-vocabulary gradient, within its standard
    error; the (k+1)-bin gradient, which spreads the tail by the student's shape, is not."""
    student, teacher = random_logits(5)
    full, full_grad = divergence_and_grad(student, teacher, "forward_kl", temperature)
    top_k, draws, repeats = 5, 8, 400
    mean_grad = sum(divergence_and_grad(student, drawn_target(teacher, top_k, temperature, draws, seed),
                                        "forward_kl", temperature)[1]
                    for seed in range(repeats)) / repeats  # fmt: skip
    # Per token, an id's estimated mass is q_tail * c / m, where its count c is m pi rounded
    # down or up (systematic draws): variance <= 1/4, so q^'s <= q_tail^2 / (4 m^2)
    # <= q_tail^2 / (4 m) (the bound independent draws, c ~ Binomial(m, pi), would give). Its
    # gradient entry is that times T / TOKENS (T^2 (p - q^) / T, over the tokens of the mean), and the mean
    # of `repeats` independent draws divides the variance by `repeats`. Six standard errors:
    # an unbiased estimate lands inside with probability 1 - 2e-9 per entry.
    tail_mass = topk_target(teacher, top_k, temperature).tail_logprob.exp().unsqueeze(-1)
    standard_error = tail_mass / (2 * math.sqrt(draws * repeats)) * temperature / TOKENS
    assert (mean_grad - full_grad).abs().le(6 * standard_error + 1e-7).all()
    _, coarse_grad = divergence_and_grad(student, topk_target(teacher, top_k, temperature), "forward_kl", temperature)
    assert (coarse_grad - full_grad).abs().gt(6 * standard_error + 1e-7).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_draws_the_loss_is_the_kl_from_the_estimated_teacher(temperature):
    """KL(q^ || p) with q^ = the top k's stored mass and tail / m per draw, against a float64
    reference built by counting the draws; its gradient is (p - q^) / T."""
    student, teacher = random_logits(8)
    target = drawn_target(teacher, 4, temperature, 6, seed=0)
    div, grad = divergence_and_grad(student, target, "forward_kl", temperature)
    log_q_bins = torch.cat([target.logprobs, target.tail_logprob.unsqueeze(-1)], -1).double()
    log_q_bins = log_q_bins - log_q_bins.logsumexp(-1, keepdim=True)
    q_hat = torch.zeros(TOKENS, VOCAB, dtype=torch.float64)
    q_hat.scatter_(-1, target.indices, log_q_bins[:, :-1].exp())
    q_hat.scatter_add_(-1, target.tail_ids, (log_q_bins[:, -1:].exp() / 6).expand(-1, 6).contiguous())
    assert torch.allclose(q_hat.sum(-1), torch.ones(TOKENS, dtype=torch.float64))
    log_p = F.log_softmax(student.double() / temperature, dim=-1)
    ref = (q_hat * (q_hat.clamp_min(1e-300).log() - log_p)).sum() * temperature**2 / TOKENS
    ref_grad = (log_p.exp() - q_hat) * temperature / TOKENS
    # fp32 against fp64: per token, sums of <= k + m terms of size <= |log q^| + |log p| <~ 40.
    torch.testing.assert_close(div.double(), ref, rtol=0, atol=40 * 10 * FP32_EPS * temperature**2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=4 * FP32_EPS * temperature)
    assert div >= 0


@pytest.mark.parametrize("kind", KINDS)
def test_with_draws_and_k_at_the_vocabulary_the_loss_is_the_full_one(kind):
    """No tail to draw from: the draws carry zero mass (forward KL), and reverse KL and JSD
    ignore them (they use the bins); every loss is the full-vocabulary one."""
    student, teacher = random_logits(2)
    full, full_grad = divergence_and_grad(student, teacher, kind, 1.0)
    drawn, drawn_grad = divergence_and_grad(student, drawn_target(teacher, VOCAB, 1.0, 4, seed=0), kind, 1.0)
    shift = VOCAB * FP32_EPS  # as in test_full_k_equals_the_full_vocabulary_loss_and_gradient
    torch.testing.assert_close(drawn, full, rtol=0, atol=shift)
    torch.testing.assert_close(drawn_grad, full_grad, rtol=0, atol=shift / TOKENS)


def test_tail_draws_come_from_a_cpu_generator_wherever_the_teacher_runs():
    """A CUDA generator seeded alike draws other numbers than the CPU's: a signal taught on a
    GPU would differ from one taught on a CPU. The draws are made on the CPU and moved."""
    from builder.teaching.signal import SignalLayout

    layout = SignalLayout.plan(8, 8, 16, 4, 1.0, VOCAB, 2)
    assert layout.draws(0).device.type == "cpu"
    teacher = random_logits(3)[1]
    first, again = (topk_target(teacher, 4, 1.0, 2, layout.draws(0)).tail_ids for _ in range(2))
    assert torch.equal(first, again)
