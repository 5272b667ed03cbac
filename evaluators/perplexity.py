"""Held-out perplexity: mean next-token NLL over fixed-length token blocks.

    blocks = torch.tensor(token_ids).view(-1, 256)       # [N, seq_len], already tokenized
    heldout_perplexity("runs/x/student-0", blocks)      # {"perplexity": 17.3, ...}

Every block is scored on its own (no state carried between blocks): position 0 is
context only, positions 1..seq_len-1 are predicted, so N * (seq_len - 1) tokens count.
Teacher and students are scored on the same blocks, so their perplexities compare.
The LM head runs over chunks of positions (builder.models.next_token_nll): a batch's full
logits, batch x seq_len x vocabulary floats, never exist, so a 128K-id vocabulary at long
blocks costs no more memory than a small one beyond the head itself.

`Perplexity` is the evaluator (evaluators.base): it reads the first blocks of a token
store's "heldout" split (builder.data.tokens) and scores them on a model handle.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from builder.data.tokens import TokenBlocks
from builder.models.next_token_nll import next_token_nll
from builder.planning.cost_model import DTYPE_BYTES, Costs, Work, forward_flops_per_token, forward_memory
from evaluators.base import Evaluator, ModelHandle, Record
from evaluators.model_loading import load_model
from evaluators.vllm_engine import lm_eval_vllm

HELDOUT = "heldout"  # the token store's split that no stage trains on


@dataclass(frozen=True)
class PerplexitySettings:
    """Score `tokens` held-out tokens, rounded down to whole blocks (at least one), from the
    token store in `heldout` (an acquire-data stage's folder), `batch_size` blocks a forward.
    `heldout` may be None where nothing runs: the estimate needs only the count."""

    tokens: int
    batch_size: int = 8
    heldout: Path | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"PerplexitySettings: {name}={getattr(self, name)!r} must be an integer >= 1.")


class Perplexity(Evaluator[PerplexitySettings]):
    name = "perplexity"
    settings_type = PerplexitySettings

    def run(self, model: ModelHandle, settings: PerplexitySettings, device: str) -> Record:
        """heldout_perplexity's record, on the model loaded on `device`."""
        if settings.heldout is None:
            raise ValueError("PerplexitySettings.heldout is None: pass the token store to read the "
                             f"{HELDOUT!r} blocks from (an acquire-data stage's folder).")
        blocks = TokenBlocks.open(settings.heldout, HELDOUT)
        head = blocks.head(max(1, settings.tokens // blocks.seq_len))
        if model.engine == "vllm":
            return vllm_perplexity(lm_eval_vllm(model).model, head)
        return heldout_perplexity(model.module(device), head, batch_size=settings.batch_size)

    def estimate(self, settings: PerplexitySettings, model_config, costs: Costs, seq_len: int) -> Work:
        """`tokens` forwarded in blocks of `seq_len`; no start-up of its own."""
        return Work(settings.tokens, forward_flops_per_token(model_config, seq_len) * settings.tokens,
                    forward_memory_of=lambda dtype: perplexity_memory(model_config, dtype, settings.batch_size, seq_len))


def perplexity_memory(model_config, dtype: str, batch_size: int, seq_len: int):
    """One batch of blocks through builder.models.next_token_nll: the body's forward, then the
    LM head over chunks of `chunk_positions` (hidden_size) positions, each chunk's logits held
    in the model's dtype, as a float32 copy and as float32 log-probabilities; and the body's
    last hidden states for the whole batch, with a float32 NLL per token."""
    compute = DTYPE_BYTES[dtype]
    chunk = model_config.hidden_size * model_config.vocab_size * (compute + 4 + 4)
    held = batch_size * seq_len * (compute * model_config.hidden_size + 4)
    return forward_memory(model_config, dtype, batch_size * seq_len, chunk + held)


def _check_blocks(blocks: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.long or blocks.dim() != 2:
        raise ValueError("blocks must be a torch.LongTensor of shape [num_blocks, seq_len]; got "
                         f"{type(blocks).__name__} {getattr(blocks, 'dtype', '')} "
                         f"{tuple(getattr(blocks, 'shape', ()))}.")
    if blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} hold nothing to predict: "
                         "pass at least one block of at least 2 tokens.")
    if blocks.min() < 0 or blocks.max() >= vocab_size:
        raise ValueError(f"blocks hold token ids in [{int(blocks.min())}, {int(blocks.max())}] "
                         f"but the model's vocabulary has {vocab_size} entries: were they "
                         "made with this model's tokenizer?")


def _batch_nll(model: torch.nn.Module, batch: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each block of a batch, in float32 whatever the model dtype,
    with the LM head taken over chunks of positions (the batch's full logits never exist)."""
    sums, _ = next_token_nll(model, batch)
    return sums.tolist()


@torch.inference_mode()
def heldout_perplexity(model_or_dir: torch.nn.Module | str | Path, blocks: torch.Tensor,
                       batch_size: int = 8, *, device: str = "cpu", dtype: str = "float32",
                       progress: bool = True) -> dict[str, float | int]:
    """Perplexity of a causal LM (or a checkpoint folder, loaded with `device`/`dtype`)
    on `blocks`. Returns {"perplexity", "nll" (mean per token, nats), "tokens", "blocks",
    "seq_len", "nll_stderr": the standard error of the mean NLL, from its spread over blocks
    (None for one block)}. A passed model keeps its device and dtype and gets its mode back."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    model = model_or_dir
    if not isinstance(model, torch.nn.Module):
        model = load_model(model_or_dir, device=device, dtype=dtype)
    _check_blocks(blocks, model.config.vocab_size)
    was_training = model.training
    model.eval()  # dropout off; restored below so a training loop can call this mid-run
    try:
        model_device = next(model.parameters()).device
        per_block: list[float] = []
        for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity",
                          disable=not progress):
            per_block += _batch_nll(model, blocks[start:start + batch_size].to(model_device))
    finally:
        model.train(was_training)
    return _record(per_block, blocks)


def vllm_perplexity(llm, blocks: torch.Tensor) -> dict[str, float | int]:
    """heldout_perplexity's record for a model served by vLLM (`llm`: a vllm.LLM), from the
    engine's own prompt log-probabilities: each block is one prompt, and the log-probability
    vLLM returns for each prompt token given the ones before it (`prompt_logprobs=0`: the
    prompt's own token, no alternatives), from the logits in float32 before any sampling
    processing (vLLM's default logprobs_mode, raw_logprobs). A request with prompt
    log-probabilities never reads the prefix cache (vLLM's SamplingParams), so every block is
    computed whole, as here on transformers."""
    # vLLM: only in the worker process that serves the model (evaluators.vllm_worker)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _check_blocks(blocks, llm.llm_engine.model_config.get_vocab_size())
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=block) for block in blocks.tolist()]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    # position 0 has no log-probability (nothing before it): context only, as in next_token_nll
    per_block = [-sum(position[token].logprob for position, token in zip(output.prompt_logprobs[1:], ids[1:]))
                 for output, ids in zip(outputs, blocks.tolist())]
    return _record(per_block, blocks)


def _record(per_block: list[float], blocks: torch.Tensor) -> dict[str, float | int]:
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    nll = sum(per_block) / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "nll_stderr": _stderr(per_block, blocks.shape[1] - 1),
            "tokens": tokens, "blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])}


def _stderr(block_sums: list[float], tokens_per_block: int) -> float | None:
    """Standard error of the mean NLL: blocks, not tokens, are the independent samples
    (tokens within a block share their context)."""
    if len(block_sums) < 2:
        return None
    return statistics.stdev(s / tokens_per_block for s in block_sums) / math.sqrt(len(block_sums))
