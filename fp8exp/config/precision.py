"""The `precision` group's schema and the FP8 recipes it can name (conf/precision/). Plain Python:
checks.py validates with these lists before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

# precision.recipe for float8 and the options each takes: TRAINABLE and OPTIONS of
# fp8exp/precision/recipes/recipe.py plus Keras' own `delayed`, listed again here because config imports
# nothing heavy and no other package (tests/test_recipes_runs.py checks that the lists agree).
_SCALED = ("margin", "power_of_2_scales", "grad_format")
FP8_RECIPES = {"delayed": ("amax_history_length",), "current": _SCALED, "rowwise": _SCALED, "rowwise_gw_hp": _SCALED,
               "block": ("margin", "power_of_2_scales", "block_size", "grad_format"), "mxfp8": ("block_size", "grad_format")}
WHATIF_ONLY_RECIPES = ("nvfp4",)
GRAD_FORMATS = ("e4m3", "e5m2")
RECIPE_KEYS = ("recipe", "margin", "power_of_2_scales", "block_size", "grad_format")


@dataclass
class PrecisionConfig:
    name: str = MISSING
    """float32 | mixed_bfloat16 | mixed_float16 | float8."""
    source_policy: Optional[str] = None
    """float8 only: the policy the model is built under before quantize("float8")."""
    recipe: Optional[str] = None
    """float8 only: the scaling recipe. delayed (Keras' own quantize("float8"): per tensor, from an amax
    history) | current (per tensor, this step's amax; TE Float8CurrentScaling, torchao tensorwise) |
    rowwise | rowwise_gw_hp (torchao: per row, E4M3, power-of-2 scales; _gw_hp: weight gradient in high
    precision) | block (DeepSeek-V3 / TE Float8BlockScaling: 1x128 tiles, 128x128 weight blocks) |
    mxfp8 (OCP MX: 32-element blocks, E8M0 scales). null = delayed."""
    amax_history_length: Optional[int] = None
    """float8, recipe delayed only: amax history window per scaled tensor; null = Keras' 1024."""
    margin: Optional[int] = None
    """current, rowwise, rowwise_gw_hp, block: scales back off by 2^margin (TE's margin); null = 0."""
    power_of_2_scales: Optional[bool] = None
    """current, rowwise, rowwise_gw_hp, block: round scales down to powers of two; null = the recipe's
    default (true, except current)."""
    block_size: Optional[int] = None
    """block, mxfp8: elements per scaling block along the contraction; null = 128 (block), 32 (mxfp8).
    A layer dimension it does not divide is padded with zeros to whole blocks (logged)."""
    grad_format: Optional[str] = None
    """Every recipe but delayed: e4m3 | e5m2, the output gradients' format; null = the recipe's
    default (e5m2 for current, e4m3 for the others)."""
    skip: Optional[str] = None
    """float8 only: regex over layer paths to keep in high precision, e.g. `head`."""
    only: Optional[str] = None
    """float8 only: regex over layer paths; quantize just the Dense/EinsumDense layers it matches."""
