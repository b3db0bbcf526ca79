"""Which operand of which matmul a recipe quantizes how. A linear layer runs three matmuls per
training step, each quantizing its two operands along ITS OWN contraction axis (2-D: X [M, K],
W [K, N], dY [M, N]):

    forward   Y  = X  @ W      contracts K: X along axis 1, W along axis 0
    dgrad     dX = dY @ W^T    contracts N: dY along axis 1, W along axis 1
    wgrad     dW = X^T @ dY    contracts M (tokens): X along axis 0, dY along axis 0

So DeepSeek-V3's 1 x 128 activation tiles run along K in the forward pass and along the tokens
in wgrad, and its 128 x 128 weight blocks serve the forward and dgrad matmuls alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .quantize import OperandSpec
from .recipe import TRAINABLE, Recipe


@dataclass(frozen=True)
class Plan:
    """The OperandSpec of each operand of the three matmuls ("none": high precision)."""

    fwd_x: OperandSpec
    fwd_w: OperandSpec
    dgrad_dy: OperandSpec
    dgrad_w: OperandSpec
    wgrad_x: OperandSpec
    wgrad_dy: OperandSpec


def plan(recipe: Recipe) -> Plan:
    """The six operand specs of a trainable recipe."""
    r, b = recipe, recipe.block_size

    def spec(granularity, fmt="e4m3"):
        return OperandSpec(granularity, fmt, b if granularity in ("tile", "block2d", "mx") else 0,
                           r.power_of_2_scales and granularity != "mx", 0 if granularity == "mx" else r.margin)

    g = r.grad_format
    if r.name == "current":
        return Plan(spec("tensor"), spec("tensor"), spec("tensor", g), spec("tensor"), spec("tensor"), spec("tensor", g))
    if r.name == "rowwise":
        return Plan(spec("row"), spec("row"), spec("row", g), spec("row"), spec("row"), spec("row", g))
    if r.name == "rowwise_gw_hp":
        return Plan(spec("row"), spec("row"), spec("row", g), spec("tensor"), spec("none"), spec("none"))
    if r.name == "block":
        return Plan(spec("tile"), spec("block2d"), spec("tile", g), spec("block2d"), spec("tile"), spec("tile", g))
    if r.name == "mxfp8":
        return Plan(spec("mx"), spec("mx"), spec("mx", g), spec("mx"), spec("mx"), spec("mx", g))
    raise ValueError(f"recipe {r.name!r} is for what-if numerics only; trainable: {', '.join(TRAINABLE)}")
