"""A model's prunable shape, in Hugging Face `config.json` names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
)


@dataclass(frozen=True)
class Shape:
    """The five numbers Minitron prunes, plus `head_dim`, which pruning always keeps.

    `head_dim` is carried explicitly because a width-pruned student's hidden size no longer
    equals heads x head_dim, and transformers would otherwise derive the wrong one.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Shape":
        """The shape of a transformers config (any supported architecture)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            num_hidden_layers=config.num_hidden_layers,
            head_dim=head_dim,
        )

    def replace(self, **changes: int) -> "Shape":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
