"""Scale statistics of one quantized operand, computed inside the jitted step so that logging
them costs no extra pass (layers.py records them in a variable each training step).

Blocks whose amax is zero (masked tokens' gradients, padding) get scale 1 by convention; they
are counted in `zero_blocks` and left out of the other statistics, which would otherwise show
that convention rather than the data. `at_bound` is the share of the other blocks whose scale
sits at the limit of its range: the scale could not follow the data (E8M0 / float32 exponent
clamped, see formats.py), so the block under- or over-flows however its values are spread.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import formats
from .quantize import OperandSpec

COLUMNS = ("scale_min", "scale_max", "scale_median", "at_bound", "zero_blocks", "amax")
"""One row of statistics; scales are decode scales (x ~= data * scale), Keras' convention."""


def at_bound(scale: jax.Array, spec: OperandSpec) -> jax.Array:
    if spec.granularity == "mx":  # X = 2**e, e clamped to [SCALE_EXP_MIN, SCALE_EXP_MAX]
        low, high = formats.pow2(jnp.int32(formats.SCALE_EXP_MIN)), formats.pow2(jnp.int32(formats.SCALE_EXP_MAX))
    else:  # decode = 1 / s, s clipped to [SCALE_MIN, SCALE_MAX]
        low, high = jnp.float32(1.0 / formats.SCALE_MAX), jnp.float32(1.0 / formats.SCALE_MIN)
    return (scale <= low) | (scale >= high)


def scale_statistics(scale: jax.Array, amax: jax.Array, spec: OperandSpec) -> jax.Array:
    """float32[len(COLUMNS)] for the decode scales of one operand and their blocks' amax."""
    scale, amax = scale.reshape(-1), amax.reshape(-1).astype(jnp.float32)
    live = jnp.isfinite(amax) & (amax > 0)
    count = jnp.sum(live)
    masked = jnp.where(live, scale, jnp.nan)
    summary = jnp.stack([jnp.nanmin(masked), jnp.nanmax(masked), jnp.nanmedian(masked)])
    summary = jnp.where(count > 0, summary, 0.0)
    bound = jnp.sum(live & at_bound(scale, spec)) / jnp.maximum(count, 1)
    zero = (scale.size - count) / scale.size
    return jnp.concatenate([summary, jnp.stack([bound, zero, jnp.max(amax)])]).astype(jnp.float32)
