"""The next-token NLL with the LM head over chunks of positions (builder.models.next_token_nll):
the same numbers as cross-entropy on the model's full logits, for every supported architecture,
and a held-out perplexity pass at a 128K-id vocabulary whose memory stays a small multiple
of the model's own size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from builder.models.next_token_nll import chunk_positions, next_token_nll
from tiny_models import ARCHITECTURES, TINY_VOCAB, one_thread, tiny_model  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _unchunked(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL per row, the logits): what held-out perplexity computed before, from the
    forward's full logits."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return per_token.view(targets.shape).sum(dim=1), logits


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("chunk", [1, 7, None, 1000])  # one position, a chunk that does not divide 48, the default, all
@torch.inference_mode()
def test_chunks_give_the_full_logits_nll(arch, chunk, input_ids):
    model = tiny_model(arch)
    sums, tokens = next_token_nll(model, input_ids, chunk)
    expected, _ = _unchunked(model, input_ids)
    assert tokens == 3 * 16 and sums.dtype == torch.float32
    # The same float32 operations on the same numbers, and each row's sum adds its tokens in
    # the same order; only the LM head's matmul runs on fewer rows, which a BLAS may block
    # differently (a one-row chunk takes the matrix-vector path): last-bit differences per
    # logit. 1e-5 relative is ~80 float32 ulps of a 16-token sum, far above that, far below
    # any real change (a wrong target or position moves a sum by whole nats).
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, None])
@torch.inference_mode()
def test_a_bfloat16_model_accumulates_in_float32_as_before(chunk, input_ids):
    model = tiny_model("llama").to(torch.bfloat16)
    sums, _ = next_token_nll(model, input_ids, chunk)
    expected, logits = _unchunked(model, input_ids)
    assert sums.dtype == torch.float32
    # The head's bf16 matmul on fewer rows may round a logit to the neighbouring bf16 value:
    # one ulp, at most 2^-7 of the largest |logit|. A token's NLL, logsumexp(z) - z_target,
    # then moves by at most twice that; a row's sum by its 16 tokens' worth.
    bound = 16 * 2 * 2**-7 * logits.abs().max().item()
    torch.testing.assert_close(sums, expected, rtol=0, atol=bound)


def test_the_default_chunk_holds_as_many_logits_as_the_head_has_weights():
    head = tiny_model("llama").get_output_embeddings()
    assert chunk_positions(head) * TINY_VOCAB == head.weight.numel()


# A 128,256-id vocabulary (Llama 3's) on the tiny 64-wide model: the tied embedding/head is
# 128,256 x 64 float32 = 32.8 MB, nearly all of the model's 33.4 MB.
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "tests")
    from tiny_models import TINY_VOCAB, tiny_model
    from evaluators.perplexity import heldout_perplexity

    def status(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

    torch.set_num_threads(1)
    vocab, blocks_of, seq_len = 128256, 3, 2048
    model = tiny_model(vocab_size=vocab, max_position_embeddings=seq_len)
    blocks = torch.randint(0, vocab, (blocks_of, seq_len), generator=torch.Generator().manual_seed(0))
    # Warm up on a small-vocabulary twin: the libraries' code and kernels are paged in and
    # initialised (~150 MB of RSS the first time), without touching a chunk-sized buffer.
    heldout_perplexity(tiny_model(max_position_embeddings=seq_len), blocks[:1, :64] % TINY_VOCAB, progress=False)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the RSS high-water mark, to the RSS now
    before = status("VmRSS")
    heldout_perplexity(model, blocks, batch_size=blocks_of, progress=False)
    print(json.dumps({"peak": status("VmHWM") - before,
                      "model": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "logits": blocks_of * (seq_len - 1) * vocab * 4}))
""")


def test_a_heldout_pass_at_a_128k_vocabulary_peaks_at_a_small_multiple_of_the_model():
    """The RSS high-water mark of a held-out perplexity pass (3 blocks of 2,048 tokens, one
    batch), in a fresh process, above its RSS before the pass.

    Torch's CPU allocations are invisible to tracemalloc and its CPU allocator caches nothing,
    so the kernel's count of resident pages is the measure; /proc/self/clear_refs resets its
    high-water mark after set-up, so only the pass is measured. glibc would keep freed blocks
    of up to 32 MB in its heap (its mmap threshold rises with each freed one) and pile the
    body's and the chunks' buffers into the high-water mark; MALLOC_MMAP_THRESHOLD_ fixed at
    128 KiB gives each large buffer its own mapping, returned at free, so the mark is the
    live peak: what the code holds, not what glibc chose to keep."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs is not writable here: the RSS high-water mark cannot be reset")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.splitlines()[-1])
    # The pass holds one chunk of float32 logits and the cross-entropy's log-softmax of it,
    # each as large as the head (~2x the model here, where the head is nearly all of it), the
    # hidden states (0.5 MB a block) and, before the head runs, the body's activations (~9 MB
    # a block). 4x the model leaves room for those; the full logits alone would be 3.2 GB,
    # ~90x, and the old pass held them twice (logits and log-softmax).
    assert measured["peak"] <= 4 * measured["model"], measured
    assert measured["logits"] > 50 * measured["model"]  # the test would see a full-logits pass
