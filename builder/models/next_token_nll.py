"""A causal LM's next-token NLL without its full logits: the model's body runs once over the
batch, its LM head over chunks of positions, so only one chunk's logits exist at a time.

    sums, tokens = next_token_nll(model, input_ids)  # sums: [batch] float32, tokens: an int

Full logits of a batch are batch x sequence x vocabulary floats: 67 GB in float32 at batch 16,
8,192-token blocks and 128,256 ids, before the model. Here the logits held at any time are
one chunk's (see `chunk_positions`), whatever the batch and sequence. Held-out perplexity
(evaluators.perplexity) scores through this, and with it the evaluate stage and the
architecture search's ranking (evaluate stages of their own).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_nll(model: torch.nn.Module, input_ids: torch.Tensor,
                   chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed NLL of each row's next tokens [batch], in float32; the number of tokens predicted)
    for `input_ids` [batch, seq_len]: positions 1..seq_len-1 of each row are predicted.

    The body (`model.base_model`) and the LM head (`get_output_embeddings`) are called apart,
    not through the model's forward: the forward's `logits_to_keep` picks which positions get
    logits in one call, so chunking with it would rerun the body once per chunk. This is the
    forward's own computation for every supported architecture (logits = lm_head(body(ids)), no
    soft-capping or scaling; tests/test_next_token_nll.py compares it for each)."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return chunked_nll(hidden[:, :-1], input_ids[:, 1:], model.get_output_embeddings(), chunk)


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed NLL of `targets` [batch, positions] under lm_head(`hidden`) [batch, positions,
    hidden_size], per row, in float32; the number of targets), `chunk` positions at a time
    (`chunk_positions(lm_head)` when None)."""
    chunk = chunk or chunk_positions(lm_head)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    # One float32 NLL per token (4 bytes each, not a vocabulary's worth), summed per row at the
    # end in the order the unchunked cross-entropy summed them.
    per_token = torch.empty(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, len(flat_targets), chunk):
        rows = slice(start, start + chunk)
        logits = lm_head(flat_hidden[rows]).float()  # the log-softmax accumulates in float32 whatever the model's dtype
        per_token[rows] = F.cross_entropy(logits, flat_targets[rows], reduction="none")
    return per_token.view(targets.shape).sum(dim=1), targets.numel()


def chunk_positions(lm_head: torch.nn.Module) -> int:
    """Positions per chunk: the LM head's input width (hidden_size). A [positions, vocab] chunk
    of logits then holds as many numbers as the head's own [vocab, hidden_size] weight, so the
    pass needs about two float32 copies of the head beyond the model (the logits chunk and the
    cross-entropy's log-softmax; a bf16 model adds its bf16 chunk), whatever the batch, the
    sequence or the vocabulary. And a chunk stays a full-sized matmul (hundreds to thousands of
    rows), so a GPU runs the head as fast as in one piece."""
    return lm_head.weight.shape[-1]
