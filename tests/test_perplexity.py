"""Held-out perplexity against a naive token-by-token computation, on a tiny random llama."""
from __future__ import annotations

import math

import pytest
import torch

from evaluators.perplexity import heldout_perplexity
from tiny_models import TINY_VOCAB, save_tiny_checkpoint, tiny_model


def _naive_nll(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean NLL, one block and one predicted position at a time."""
    nlls = []
    with torch.no_grad():
        for block in blocks:
            log_probs = torch.log_softmax(model(input_ids=block[None]).logits[0].double(), -1)
            nlls += [-log_probs[i - 1, block[i]].item() for i in range(1, len(block))]
    return sum(nlls) / len(nlls)


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY_VOCAB, (5, 17), generator=generator)


def test_perplexity_is_exp_of_naive_token_nll(blocks):
    model = tiny_model()
    result = heldout_perplexity(model, blocks, batch_size=2, progress=False)  # 2 + 2 + 1
    naive = _naive_nll(model, blocks)
    assert result["tokens"] == 5 * 16 and result["blocks"] == 5 and result["seq_len"] == 17
    assert result["nll"] == pytest.approx(naive, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(naive), rel=1e-5)
    # A random model is near-uniform over the vocabulary, far from a trained one.
    assert TINY_VOCAB / 4 < result["perplexity"] < TINY_VOCAB * 4


def test_checkpoint_dir_gives_the_same_result_and_mode_is_restored(tmp_path, blocks):
    model = tiny_model().train()
    from_model = heldout_perplexity(model, blocks, batch_size=8, progress=False)
    assert model.training  # a training loop that calls this keeps its dropout
    from_dir = heldout_perplexity(save_tiny_checkpoint(tmp_path), blocks, progress=False)
    assert from_dir["nll"] == pytest.approx(from_model["nll"], rel=1e-6)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 8), "LongTensor"),
    (torch.zeros(8, dtype=torch.long), "LongTensor"),
    (torch.zeros(2, 1, dtype=torch.long), "at least 2 tokens"),
    (torch.full((2, 8), TINY_VOCAB, dtype=torch.long), "vocabulary has 384"),
])
def test_bad_blocks_are_refused_with_the_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        heldout_perplexity(tiny_model(), bad, progress=False)
