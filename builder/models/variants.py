"""What the quantized variants' schemes need of a model and take on disk (no torch): the W4A16
group size per model, the widths vLLM's kernels take, the checkpoint's bytes, and where FP8 is
served at speed. The variants themselves: builder.stages.quantize, builder.models.quantize_main.
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
