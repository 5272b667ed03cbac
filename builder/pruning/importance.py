"""Minitron activation-based importance (arXiv 2407.14679, section 2.2), in one forward pass.

Forward hooks collect, per calibration batch, one statistic per unit and accumulate it, so no
activation outlives its batch:

- MLP neurons: the input of `down_proj` (the activated MLP output);
- attention heads: the input of `o_proj`, scored per channel then L2-normed over `head_dim`;
- embedding channels: the output of every `input_layernorm` / `post_attention_layernorm`,
  scored per norm and summed over all of them;
- depth: block importance, 1 - cosine(layer input, layer output), averaged over tokens.

Each channel's activations are reduced over the sequence first, then over the calibration
samples (`sequence_aggregation`, `batch_aggregation` in {mean, l2, var}; the paper's best,
Table 11, is mean over the sequence and L2 over the batch). This follows NVIDIA ModelOpt's
Minitron hooks (`modelopt/torch/nas/plugins/megatron.py`).

The forward runs the decoder without its LM head: no score needs logits, and at small model
sizes the vocabulary projection is the largest matmul, which pays for the hooks
(`bench.pruning` times scoring against a plain forward pass). The optional `lm_loss` depth
metric (the loss increase when one layer is skipped) does need logits and costs one extra
forward pass per layer over its samples.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from builder.models.arch import Arch, arch_for
from builder.planning.cost_model import ForwardMemory, forward_memory
from builder.spec.shape import Shape
from builder.store.content import verify_files

AGGREGATIONS = ("mean", "l2", "var")
DEFAULT_BATCH_AGGREGATION = "l2"  # the paper's best (Table 11); spec.ScoringSpec has the same
DEFAULT_SEQUENCE_AGGREGATION = "mean"
TENSORS_FILE = "importance.safetensors"
METADATA_FILE = "importance.json"
FORMAT_VERSION = 1


@dataclass
class Importance:
    """Importance of every prunable unit of one teacher; higher means keep."""

    mlp: torch.Tensor  # [layers, intermediate_size]
    heads: torch.Tensor  # [layers, num_attention_heads]
    hidden: torch.Tensor  # [hidden_size]
    block: torch.Tensor  # [layers], 1 - cosine(input, output) of each decoder layer
    layer_loss: torch.Tensor | None  # [layers], LM-loss increase when the layer is skipped
    teacher_shape: Shape
    model_type: str
    batch_aggregation: str
    sequence_aggregation: str
    num_samples: int
    seq_len: int
    lm_loss_samples: int = 0

    def save(self, directory: str | Path) -> None:
        """Write `importance.safetensors` (the tensors) and `importance.json` (the rest)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in self._tensors().items()},
                  directory / TENSORS_FILE)
        (directory / METADATA_FILE).write_text(json.dumps(self._metadata(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Importance":
        directory = Path(directory)
        verify_files([directory / METADATA_FILE, directory / TENSORS_FILE])  # as the score stage wrote them
        metadata = json.loads((directory / METADATA_FILE).read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / METADATA_FILE}: format_version={metadata.get('format_version')!r} is not "
                f"{FORMAT_VERSION}; rescore the teacher with this version of minizoo"
            )
        tensors = {"layer_loss": None} | load_file(directory / TENSORS_FILE)  # layer_loss is optional
        del metadata["format_version"]
        metadata["teacher_shape"] = Shape(**metadata["teacher_shape"])
        return cls(**tensors, **metadata)

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"mlp": self.mlp, "heads": self.heads, "hidden": self.hidden, "block": self.block}
        if self.layer_loss is not None:
            tensors["layer_loss"] = self.layer_loss
        return tensors

    def _metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model_type": self.model_type,
            "teacher_shape": self.teacher_shape.as_dict(),
            "batch_aggregation": self.batch_aggregation,
            "sequence_aggregation": self.sequence_aggregation,
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "lm_loss_samples": self.lm_loss_samples,
        }


# ---------------------------------------------------------------------------------------------
# Streaming statistics


def reduce_sequence(activations: torch.Tensor, how: str) -> torch.Tensor:
    """[batch, seq, channels] -> [batch, channels] in float32.

    Written as elementwise ops then a plain sum over the sequence: on CPU that is much
    faster than `vector_norm(dim=1)` or `var(dim=1)`, which reduce over a strided axis.
    """
    x = activations.float()
    if how == "mean":  # of |x|
        return x.abs().sum(dim=1) / x.shape[1]
    if how == "l2":
        return x.square().sum(dim=1).sqrt()
    return (x - x.mean(dim=1, keepdim=True)).square().mean(dim=1)


def one_minus_cosine(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over the last axis, as `F.cosine_similarity` (eps 1e-8), but faster on CPU."""
    a, b = inputs.float(), outputs.float()
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return 1 - (a * b).sum(dim=-1) / norms.clamp_min(1e-8)


@dataclass
class ChannelStat:
    """Per-channel importance of one activation, accumulated over calibration batches.

    Keeps only the running sums its batch aggregation needs (squares for L2, sums for mean,
    both in float64 for variance, whose formula cancels), so streaming is exact: batching
    does not change the result, and each hook call costs a handful of small ops.
    """

    sequence_aggregation: str
    batch_aggregation: str
    count: int = 0
    total: torch.Tensor | None = None  # sum over samples
    squares: torch.Tensor | None = None  # sum of squares over samples

    def add(self, activations: torch.Tensor) -> None:
        per_sample = reduce_sequence(activations.detach(), self.sequence_aggregation)
        if self.batch_aggregation == "var":
            per_sample = per_sample.double()
        if self.batch_aggregation != "l2":
            self.total = _accumulate(self.total, per_sample.sum(dim=0))
        if self.batch_aggregation != "mean":
            self.squares = _accumulate(self.squares, per_sample.square().sum(dim=0))
        self.count += per_sample.shape[0]

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no activations reached this hook; is the module used in forward?")
        if self.batch_aggregation == "l2":
            return self.squares.sqrt().float().cpu()
        mean = self.total / self.count
        if self.batch_aggregation == "mean":
            return mean.float().cpu()
        return (self.squares / self.count - mean.square()).clamp_min(0).float().cpu()


def _accumulate(running: torch.Tensor | None, batch: torch.Tensor) -> torch.Tensor:
    return batch if running is None else running.add_(batch)


@dataclass
class BlockStat:
    """Mean over tokens of 1 - cosine(layer input, layer output): ~0 for a layer that does nothing."""

    total: torch.Tensor | None = None  # kept on the model's device: no GPU sync per layer
    tokens: int = 0

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        distance = one_minus_cosine(inputs.detach(), outputs.detach())
        total = distance.sum(dtype=torch.float64)
        self.total = total if self.total is None else self.total + total
        self.tokens += distance.numel()

    def result(self) -> float:
        if self.total is None:
            raise RuntimeError("no hidden states reached this layer's hook")
        return self.total.item() / self.tokens


@dataclass
class _Collector:
    """Every statistic of one scoring run, and the hooks that feed them."""

    mlp: list[ChannelStat]
    heads: list[ChannelStat]
    norms: list[ChannelStat]  # one per norm per layer; summed into hidden importance
    blocks: list[BlockStat]
    handles: list = field(default_factory=list)

    @classmethod
    def for_layers(cls, layers: int, norms_per_layer: int, sequence: str, batch: str) -> "_Collector":
        def stats(count: int) -> list[ChannelStat]:
            return [ChannelStat(sequence, batch) for _ in range(count)]
        return cls(stats(layers), stats(layers), stats(layers * norms_per_layer),
                   [BlockStat() for _ in range(layers)])

    def attach(self, layers: Sequence[nn.Module], arch: Arch) -> None:
        for index, layer in enumerate(layers):
            self._hook_input(layer.get_submodule(arch.mlp_down), self.mlp[index])
            self._hook_input(layer.get_submodule(arch.attention_out), self.heads[index])
            for offset, norm in enumerate(arch.layer_norms):
                stat = self.norms[index * len(arch.layer_norms) + offset]
                self.handles.append(layer.get_submodule(norm).register_forward_hook(
                    lambda module, args, output, stat=stat: stat.add(output)))
            self.handles.append(layer.register_forward_hook(
                _block_hook(self.blocks[index]), with_kwargs=True))

    def _hook_input(self, module: nn.Module, stat: ChannelStat) -> None:
        # A pre-hook sees the input only, which is all these statistics need.
        self.handles.append(module.register_forward_pre_hook(lambda module, args: stat.add(args[0])))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _block_hook(stat: BlockStat):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        inputs = args[0] if args else kwargs["hidden_states"]
        stat.add(inputs, output[0] if isinstance(output, tuple) else output)
    return hook


# ---------------------------------------------------------------------------------------------
# Scoring


def score_importance(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    batch_aggregation: str = DEFAULT_BATCH_AGGREGATION,
    sequence_aggregation: str = DEFAULT_SEQUENCE_AGGREGATION,
    lm_loss_samples: int = 0,
    progress: bool = True,
) -> Importance:
    """Score every unit of `model` on calibration `blocks` ([samples, seq_len] token ids).

    `lm_loss_samples` > 0 also measures, on the first that many blocks, how much the LM loss
    rises when each layer is skipped (one forward pass per layer).
    """
    _check_inputs(blocks, batch_size, batch_aggregation, sequence_aggregation, lm_loss_samples)
    arch = arch_for(model.config)
    layers = _layers(model, arch)
    collector = _Collector.for_layers(len(layers), len(arch.layer_norms), sequence_aggregation,
                                      batch_aggregation)
    collector.attach(layers, arch)
    try:
        with _evaluating(model):
            _forward_backbone(model.get_submodule(arch.backbone), blocks, batch_size, progress)
    finally:
        collector.detach()
    layer_loss = None
    if lm_loss_samples:
        layer_loss = layer_loss_increase(model, blocks[:lm_loss_samples], batch_size, progress)
    return _importance(model, collector, layer_loss, blocks, batch_aggregation,
                       sequence_aggregation, lm_loss_samples)


def _check_inputs(blocks: torch.Tensor, batch_size: int, batch_aggregation: str,
                  sequence_aggregation: str, lm_loss_samples: int) -> None:
    if blocks.dim() != 2 or blocks.dtype != torch.long or blocks.shape[0] == 0:
        raise ValueError(
            f"calibration blocks must be a non-empty LongTensor [samples, seq_len]; got dtype "
            f"{blocks.dtype} and shape {tuple(blocks.shape)}"
        )
    for name, value in (("batch_aggregation", batch_aggregation),
                        ("sequence_aggregation", sequence_aggregation)):
        if value not in AGGREGATIONS:
            raise ValueError(f"{name}={value!r} is not an aggregation; use one of {', '.join(AGGREGATIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if not 0 <= lm_loss_samples <= blocks.shape[0]:
        raise ValueError(
            f"lm_loss_samples={lm_loss_samples} must be between 0 and the {blocks.shape[0]} "
            "calibration blocks; lower it or score with more samples"
        )


def _layers(model: nn.Module, arch: Arch) -> nn.ModuleList:
    return model.get_submodule(arch.layers)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the caller's training mode comes back."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _batches(blocks: torch.Tensor, batch_size: int, progress: bool, what: str) -> Iterator[torch.Tensor]:
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc=what, unit="batch", disable=not progress):
        yield blocks[start:start + batch_size]


def _forward_backbone(backbone: nn.Module, blocks: torch.Tensor, batch_size: int, progress: bool) -> None:
    device = next(backbone.parameters()).device
    for batch in _batches(blocks, batch_size, progress, "scoring importance"):
        backbone(input_ids=batch.to(device), use_cache=False)


def _importance(model: nn.Module, collector: _Collector, layer_loss: torch.Tensor | None,
                blocks: torch.Tensor, batch_aggregation: str, sequence_aggregation: str,
                lm_loss_samples: int) -> Importance:
    shape = Shape.of(model.config)
    return Importance(
        mlp=torch.stack([stat.result() for stat in collector.mlp]),
        heads=torch.stack([_per_head(stat.result(), shape) for stat in collector.heads]),
        hidden=torch.stack([stat.result() for stat in collector.norms]).sum(dim=0),
        block=torch.tensor([stat.result() for stat in collector.blocks], dtype=torch.float32),
        layer_loss=layer_loss,
        teacher_shape=shape,
        model_type=model.config.model_type,
        batch_aggregation=batch_aggregation,
        sequence_aggregation=sequence_aggregation,
        num_samples=blocks.shape[0],
        seq_len=blocks.shape[1],
        lm_loss_samples=lm_loss_samples,
    )


def _per_head(channel_scores: torch.Tensor, shape: Shape) -> torch.Tensor:
    """A head's importance is the L2 norm of its channels' scores (as in ModelOpt)."""
    per_head = channel_scores.view(shape.num_attention_heads, shape.head_dim)
    return torch.linalg.vector_norm(per_head, ord=2, dim=1)


# ---------------------------------------------------------------------------------------------
# Depth by LM loss


class SkippedLayer(nn.Module):
    """Stands in for a decoder layer and passes the hidden states through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def skipping_layers(model: nn.Module, indices: Sequence[int]) -> Iterator[None]:
    """Run `model` as if the decoder layers at `indices` were removed; they come back afterwards.

    The layer list keeps its length, so per-layer config (layer_types, cache slots) still lines up.
    """
    layers = _layers(model, arch_for(model.config))
    originals = {index: layers[index] for index in indices}
    try:
        for index in indices:
            layers[index] = SkippedLayer()
        yield
    finally:
        for index, layer in originals.items():
            layers[index] = layer


def lm_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int, progress: bool = False) -> float:
    """Mean next-token cross-entropy of `model` over every predicted token of `blocks`."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with _evaluating(model):
        for batch in _batches(blocks, batch_size, progress, "LM loss"):
            batch = batch.to(device)
            predicted = batch.numel() - batch.shape[0]  # the first token of a block is never predicted
            total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * predicted
            tokens += predicted
    return total / tokens


def layer_loss_increase(model: nn.Module, blocks: torch.Tensor, batch_size: int,
                        progress: bool = True) -> torch.Tensor:
    """[layers]: LM loss with each single layer skipped, minus the full model's loss."""
    if blocks.shape[1] < 2:
        raise ValueError(f"seq_len={blocks.shape[1]} leaves no token to predict; use blocks of >= 2 tokens")
    baseline = lm_loss(model, blocks, batch_size)
    count = len(_layers(model, arch_for(model.config)))
    increases = []
    for index in tqdm(range(count), desc="LM loss per skipped layer", disable=not progress):
        with skipping_layers(model, [index]):
            increases.append(lm_loss(model, blocks, batch_size) - baseline)
    return torch.tensor(increases, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Memory: what the estimate predicts for the score stage (builder.stages.score)


def importance_memory(config, batch_size: int, seq_len: int, *, lm_loss_batch: int = 0,
                      sequence_aggregation: str = DEFAULT_SEQUENCE_AGGREGATION,
                      batch_aggregation: str = DEFAULT_BATCH_AGGREGATION) -> ForwardMemory:
    """Bytes on one device of `score_importance` over batches of `batch_size` blocks, the model
    in float32 (the score stage loads it so wherever it runs): the larger of its two passes,
    which run one after another; `lm_loss_batch`: the LM-loss pass's batch (0: no such pass)."""
    scoring = _scoring_memory(config, batch_size * seq_len, sequence_aggregation, batch_aggregation)
    if not lm_loss_batch:
        return scoring
    return max(scoring, _lm_loss_memory(config, lm_loss_batch * seq_len), key=lambda memory: memory.total)


def _scoring_memory(config, tokens: int, sequence_aggregation: str, batch_aggregation: str) -> ForwardMemory:
    """_forward_backbone: the decoder without its LM head (no logits), plus the hooks' own."""
    shape = Shape.of(config)
    q_width = shape.num_attention_heads * shape.head_dim
    # reduce_sequence: `x.abs()` (mean) or `x.square()` (l2) is one float32 copy of the hooked
    # activation, the widest being down_proj's input; var's `x - mean` and its `.square()` two
    copies = 2 if sequence_aggregation == "var" else 1
    # one_minus_cosine (BlockStat.add, after each layer): `a * b`, one float32 copy of the hidden states
    temporaries = 4 * tokens * max(copies * max(shape.intermediate_size, q_width, shape.hidden_size),
                                   shape.hidden_size)
    # ChannelStat's running sums for the whole pass, per unit: `squares` (l2) or `total` (mean)
    # in float32, both in float64 (var, whose per_sample is `.double()`)
    per_unit = 16 if batch_aggregation == "var" else 4
    units = shape.num_hidden_layers * (shape.intermediate_size + q_width
                                       + len(arch_for(config).layer_norms) * shape.hidden_size)
    return forward_memory(config, "float32", tokens, 0.0, held=temporaries + per_unit * units)


def _lm_loss_memory(config, tokens: int) -> ForwardMemory:
    """lm_loss: `model(input_ids=batch, labels=batch)` returns the batch's whole logits in
    float32 (the LM head's output), and after the forward transformers' ForCausalLMLoss takes
    cross_entropy over them (`.float()` of float32 copies nothing): its log_softmax, one more
    float32 copy."""
    logits = 4 * tokens * config.vocab_size
    return forward_memory(config, "float32", tokens, logits, after=logits)
