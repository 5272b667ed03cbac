"""What the quantized variants' schemes need of a model and take on disk (no torch): the W4A16
group size per model, the widths vLLM's kernels and GGUF's blocks take, the checkpoint's or the
GGUF file's bytes, and where FP8 is served at speed. The variants themselves:
builder.stages.quantize, builder.models.quantize_main (compressed-tensors) and builder.stages.gguf,
builder.models.llama_cpp (GGUF).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.options.precision import cpu_flags
from builder.spec.schema import W4A16_GROUP_SIZES, VariantSpec
from builder.spec.shape import Shape

# vLLM CPU's WNA16 kernels (and the GPU's Marlin ones) take a Linear whose input and output
# widths are multiples of 32; the variants' other schemes take any width.
WNA16_WIDTH_MULTIPLE = 32


@dataclass(frozen=True)
class SchemeFacts:
    weight_bits: int
    scale_per: str  # "channel": one scale per output row; "group": one per group of input channels


SCHEMES = {"w8a8-int8": SchemeFacts(8, "channel"), "w4a16": SchemeFacts(4, "group"),
           "fp8-dynamic": SchemeFacts(8, "channel")}
SCALE_BYTES = 2  # llm-compressor stores scales in the checkpoint's 16-bit dtype
# GGUF: every quantized type's blocks hold 32 weights of a row (Q8_0, Q5_0) or 256 (the k-quants'
# super-blocks, Q4_K and Q6_K); bits per weight with the blocks' scales (ggml's type sizes).
GGUF_BLOCK = 32
GGUF_SUPER_BLOCK = 256
GGUF_BITS = {"Q8_0": 8.5, "Q5_0": 5.5, "Q4_K": 4.5, "Q6_K": 6.5625}
# What llama-quantize writes a k-quant tensor as when its rows are no multiple of 256 wide
# (llama.cpp's tensor-type fallback, logged "falling back to q5_0")
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
# The file's metadata beside its tensors: mostly the tokenizer (a 49k-token BPE vocabulary with its
# merges is about 1.8 MB)
GGUF_METADATA_BYTES = 2e6


def linear_widths(shape: Shape) -> dict[str, int]:
    """Every input and output width of a layer's Linear modules (attention and MLP)."""
    return {"hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
            "num_attention_heads x head_dim": shape.num_attention_heads * shape.head_dim,
            "num_key_value_heads x head_dim": shape.num_key_value_heads * shape.head_dim}


def input_widths(shape: Shape) -> dict[str, int]:
    """The widths a W4A16 group divides: each Linear's input (q/k/v and gate/up read hidden_size,
    o_proj the heads' outputs, down_proj the MLP's)."""
    widths = linear_widths(shape)
    return {name: widths[name] for name in ("hidden_size", "intermediate_size", "num_attention_heads x head_dim")}


def auto_group_size(shape: Shape) -> int | None:
    """The largest W4A16 group size dividing every input width (more channels per scale: a
    smaller file); None when none does."""
    return next((size for size in W4A16_GROUP_SIZES if all(w % size == 0 for w in input_widths(shape).values())), None)


def group_size_for(variant: VariantSpec, shape: Shape) -> int | None:
    """The W4A16 group size a model's variant is made with (None for the other schemes)."""
    if variant.scheme != "w4a16":
        return None
    return auto_group_size(shape) if variant.group_size == "auto" else variant.group_size


def variant_problem(variant: VariantSpec, shape: Shape) -> str | None:
    """Why this model's variant could not be made or served, with the fix; None when it can."""
    if variant.is_gguf:
        odd = {name: width for name, width in input_widths(shape).items() if width % GGUF_BLOCK}
        if odd:
            listed = ", ".join(f"{name}={width}" for name, width in odd.items())
            return (f"{variant.scheme} needs every Linear's input width to be a multiple of {GGUF_BLOCK} (GGUF's "
                    f"quantization blocks), and {listed} is not; choose widths that are multiples of {GGUF_BLOCK} "
                    f"(search.width_multiple for a searched student) or remove the {variant.scheme} variant")
        return None
    if variant.scheme != "w4a16":
        return None
    odd = {name: width for name, width in linear_widths(shape).items() if width % WNA16_WIDTH_MULTIPLE}
    if odd:
        listed = ", ".join(f"{name}={width}" for name, width in odd.items())
        return (f"w4a16 needs every Linear width to be a multiple of {WNA16_WIDTH_MULTIPLE} (vLLM's WNA16 "
                f"kernels), and {listed} is not; choose widths that are multiples of {WNA16_WIDTH_MULTIPLE} "
                "(search.width_multiple for a searched student) or remove the w4a16 variant")
    size = group_size_for(variant, shape)
    widths = input_widths(shape)
    if size is None or any(width % size for width in widths.values()):
        fits = auto_group_size(shape)
        listed = ", ".join(f"{name}={width}" for name, width in widths.items())
        return (f"group_size {variant.group_size} does not divide every input width ({listed}); use "
                f"group_size: {fits} (the largest that does) or group_size: auto")
    return None


def variant_bytes(variant: VariantSpec, shape: Shape, params: int, dtype_bytes: int) -> float:
    """The variant's weights on disk: the layers' Linear weights at the scheme's bits plus their
    scales; embeddings, norms and the LM head (kept unquantized) in the checkpoint's dtype."""
    if variant.is_gguf:
        return gguf_bytes(variant, shape, params)
    widths = linear_widths(shape)
    hidden, mlp = shape.hidden_size, shape.intermediate_size
    attention_out = 2 * widths["num_attention_heads x head_dim"] + 2 * widths["num_key_value_heads x head_dim"]
    per_layer = hidden * attention_out + 3 * hidden * mlp  # q, o + k, v; gate, up, down
    linear = shape.num_hidden_layers * per_layer
    facts = SCHEMES[variant.scheme]
    if facts.scale_per == "group":
        scales = linear / (group_size_for(variant, shape) or min(W4A16_GROUP_SIZES))
    else:  # one per output row of each Linear
        scales = shape.num_hidden_layers * (attention_out - widths["num_attention_heads x head_dim"] + 2 * mlp
                                            + 2 * hidden)
    return linear * facts.weight_bits / 8 + scales * SCALE_BYTES + (params - linear) * dtype_bytes


def gguf_fallbacks(variant: VariantSpec, shape: Shape) -> dict[str, int]:
    """The input widths whose tensors a k-quant variant (gguf-q4_k_m) cannot store in 256-weight
    super-blocks: llama-quantize writes those tensors as Q5_0 (for Q4_K) or Q8_0 (for Q6_K), a
    larger file of about the same accuracy. Accepted, not refused: it is what llama.cpp and the
    community's Q4_K_M files of such models do; the dry run notes it, the size estimate counts it
    and the stage records the file's actual tensor types."""
    if variant.scheme != "gguf-q4_k_m":
        return {}
    return {name: width for name, width in input_widths(shape).items() if width % GGUF_SUPER_BLOCK}


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits (src/llama-quant.cpp): the layers whose attn_v and ffn_down
    Q4_K_M stores at Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def gguf_bytes(variant: VariantSpec, shape: Shape, params: int) -> float:
    """The GGUF file's bytes: each layer's Linear weights at the type llama-quantize picks for
    them (Q8_0 for gguf-q8_0; for gguf-q4_k_m Q4_K, attn_v and ffn_down at Q6_K in llama.cpp's
    more-bits layers, each with its fallback where 256 does not divide its input width); the
    embeddings at Q8_0 or Q6_K (a tied embedding is the output layer; an untied one's input
    embedding is Q4_K, so this errs large); norms negligible; the metadata."""
    widths = linear_widths(shape)
    hidden, mlp, heads = shape.hidden_size, shape.intermediate_size, widths["num_attention_heads x head_dim"]
    kv = widths["num_key_value_heads x head_dim"]

    def at(kind: str, inputs: int, count: int) -> float:
        if variant.scheme == "gguf-q4_k_m" and inputs % GGUF_SUPER_BLOCK:
            kind = K_QUANT_FALLBACK[kind]
        return count * GGUF_BITS[kind] / 8

    if variant.scheme == "gguf-q8_0":
        return params * GGUF_BITS["Q8_0"] / 8 + GGUF_METADATA_BYTES
    total, linear = 0.0, 0
    for layer in range(shape.num_hidden_layers):
        more = "Q6_K" if _more_bits(layer, shape.num_hidden_layers) else "Q4_K"
        total += at("Q4_K", hidden, hidden * (heads + kv) + 2 * hidden * mlp)  # q, k; gate, up
        total += at(more, hidden, hidden * kv) + at("Q4_K", heads, heads * hidden) + at(more, mlp, mlp * hidden)
        linear += hidden * (2 * heads + 2 * kv) + 3 * hidden * mlp
    return total + at("Q6_K", hidden, params - linear) + GGUF_METADATA_BYTES


def fp8_serving(use_gpu: bool, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Whether vLLM serves an fp8-dynamic variant at speed where this build runs: on a GPU
    (compute capability 8.9+ natively, older ones weight-only), or on a CPU with AMX. Elsewhere
    it loads (llm-compressor's FP8 checkpoints were loaded by vLLM CPU 0.32) but is unverified."""
    if use_gpu:
        return "unverified: needs a GPU of compute capability 8.9+ (older ones run it weight-only); no GPU run yet"
    if "amx_tile" in cpu_flags(cpuinfo):  # the flags line only, as --precision auto reads it
        return "unverified: this CPU has AMX (vLLM's CPU fp8 path); not yet measured"
    return ("unverified: this CPU has no AMX and no GPU is used, so vLLM has no fast fp8 path here; built, but "
            "serve it on a GPU of compute capability 8.9+ or a CPU with AMX")
