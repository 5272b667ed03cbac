"""The teacher's stored signal as a training target (`TopKTarget`), and how the teach pass
makes one from teacher logits (`topk_target`). builder.training.losses reads it; it lives
with the teach pass because the signal's format is defined here, not by any one loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The loss sees logits [tokens, vocab]; with a 49152-wide vocab, 1024 tokens are 200 MB per
# fp32 copy. Chunks of this many tokens bound the loss's temporaries (log-softmaxes,
# probabilities) to a few chunk-sized copies; each chunk's gradient is taken right away
# (see _ChunkedLosses) instead of keeping its temporaries alive for backward.
LOSS_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class TopKTarget:
    """The teacher's stored signal for T tokens, at the distillation temperature."""

    indices: torch.Tensor  # [T, k] int64 token ids (the teacher's k most likely)
    logprobs: torch.Tensor  # [T, k] log softmax(teacher_logits / temperature) at those ids (fp16 from disk)
    tail_logprob: torch.Tensor  # [T] log of the mass outside the top k; -inf (or very negative) when k == vocab
    tail_ids: torch.Tensor | None = None  # [T, m] int64 ids drawn from the teacher within the tail (repeats kept)

    def __getitem__(self, rows: slice) -> TopKTarget:
        tail_ids = None if self.tail_ids is None else self.tail_ids[rows]
        return TopKTarget(self.indices[rows], self.logprobs[rows], self.tail_logprob[rows], tail_ids)

    def to(self, device: torch.device) -> TopKTarget:
        tail_ids = None if self.tail_ids is None else self.tail_ids.to(device)
        return TopKTarget(self.indices.to(device), self.logprobs.to(device), self.tail_logprob.to(device), tail_ids)

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    @property
    def tail_samples(self) -> int:
        return 0 if self.tail_ids is None else self.tail_ids.shape[-1]


def topk_target(
    teacher_logits: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> TopKTarget:
    """What the teach pass stores, from teacher logits [T, vocab]: the k most likely ids, their
    log-probabilities at `temperature`, the log of the rest's mass and, with `tail_samples`
    = m > 0, m ids drawn (with replacement, from `generator`) from the teacher's distribution
    within that rest; in fp32, chunk by chunk (like the losses, so a 150k vocabulary does not
    hold several fp32 copies of all logits)."""
    vocab = teacher_logits.shape[-1]
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} is outside 1..{vocab} (the vocabulary size); pick a k in that range")
    if tail_samples < 0:
        raise ValueError(f"tail_samples={tail_samples} is negative; use 0 (no samples) or more")
    with torch.no_grad():
        chunks = [_topk_chunk(teacher_logits[start : start + chunk_tokens], top_k, temperature, tail_samples,
                              generator)
                  for start in range(0, teacher_logits.shape[0], chunk_tokens)]  # fmt: skip
    indices, logprobs, tail, tail_ids = (torch.cat(parts) for parts in zip(*chunks))
    return TopKTarget(indices, logprobs, tail, tail_ids if tail_samples else None)


def _topk_chunk(
    logits: torch.Tensor, top_k: int, temperature: float, tail_samples: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, ...]:
    log_q = F.log_softmax(softened(logits, temperature), dim=-1)
    values, indices = log_q.topk(top_k, dim=-1)
    # The tail's mass is the sum of its probabilities, not 1 - sum(top-k probs): when the top
    # k hold all but 1e-9 of the mass, that difference cancels to 0 in fp32, and a sum of
    # positive terms cannot cancel. One exp pass serves the sum and the draws; a tail whose
    # every probability underflows fp32 (all below e^-103) is stored as empty (-inf).
    tail_probs = log_q.exp_().scatter_(-1, indices, 0.0)  # in log_q's memory
    tail = tail_probs.sum(-1).log()  # -inf when k == vocab
    return indices, values, tail, _draw_tail(tail_probs, tail, indices, tail_samples, generator)


def _draw_tail(
    tail_probs: torch.Tensor, tail: torch.Tensor, indices: torch.Tensor, count: int, generator: torch.Generator | None
) -> torch.Tensor:
    """`count` ids per token drawn from the teacher's probabilities outside its top k
    (`tail_probs`: its probabilities with the top k at 0), by systematic sampling: one
    uniform offset u per token, and the ids whose stretch of the cumulative tail mass holds
    the points (u + j) / count of it, j < count.

    Each id is drawn count x its share of the tail times in expectation, as with independent
    draws (so the target stays unbiased), but always that number rounded down or up, where
    independent draws' counts scatter binomially around it, which is gradient noise on the
    tail ids that carry the most mass. (No current bench file compares the two ways.)
    """
    if count == 0:
        return indices.new_empty((indices.shape[0], 0))
    # A row with no tail mass in fp32 (k == vocab, or a tail below e^-103) cannot be drawn
    # from; its draws carry that zero mass, so any id does: its top-1.
    empty = tail == float("-inf")
    tail_probs[empty] = F.one_hot(indices[empty, 0], tail_probs.shape[-1]).to(tail_probs.dtype)
    # float64: an fp32 running sum over a 49152-id tail would swallow increments below 2^-24
    # of it, and those ids could never be drawn.
    cumulative = tail_probs.double().cumsum_(-1)
    # Drawn on the CPU and moved: the same seed gives the same draws whether the teacher ran
    # on a GPU or a CPU (a CUDA generator's stream differs from the CPU's).
    offsets = torch.rand(len(cumulative), 1, generator=generator, dtype=torch.float64).to(cumulative.device)
    points = (offsets + torch.arange(count, device=cumulative.device)) / count * cumulative[:, -1:]
    return torch.searchsorted(cumulative, points, right=True).clamp_(max=cumulative.shape[-1] - 1)


def softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # Dividing by 1 is exact but still copies a chunk: skip it (and .float() of fp32 is free).
    return logits.float() if temperature == 1 else logits.float() / temperature
