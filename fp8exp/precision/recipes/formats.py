"""Number formats of the recipes and their exact rounding, in jax.numpy.

Rounding is round-to-nearest-even (RNE) and saturating: values are first clipped to the largest
finite value of the format, then converted with XLA's `convert`, which rounds RNE and handles the
formats' subnormals exactly (checked bit for bit against `ml_dtypes` over all ties and subnormals).
Saturation is what Transformer Engine, torchao and the OCP MX spec (v1.0, section 6.3) do; a
plain cast would turn E4M3 overflow into NaN. NaN stays NaN; +-inf saturates to +-max.

Scales are float32. XLA on CPU flushes float32 subnormals to zero, so every scale is kept in the
normal range: powers of two are built from their exponent bits, exponents are clamped to
[SCALE_EXP_MIN, SCALE_EXP_MAX], and non-power-of-two scales are clipped to the same range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes

# Element formats: the OCP names of TE / torchao / MX, mapped to their exact jnp dtypes.
DTYPES = {
    "e4m3": jnp.float8_e4m3fn,  # OCP E4M3 (fn: no inf, one NaN), max 448
    "e5m2": jnp.float8_e5m2,    # OCP E5M2 (IEEE-like), max 57344
    "e2m1": jnp.float4_e2m1fn,  # OCP FP4 E2M1 (NVFP4 / MXFP4 data), max 6
}
MAX = {name: float(ml_dtypes.finfo(dtype).max) for name, dtype in DTYPES.items()}
# emax_elem of the OCP MX spec v1.0 (table 1): the exponent of the format's largest normal.
EMAX = {"e4m3": 8, "e5m2": 15, "e2m1": 2}
# Float32 scales stay normal (see the module docstring). E8M0 itself spans 2**-127..2**127;
# 2**-127 is a float32 subnormal, so an MX block whose amax is below 2**-118 gets 2**-126.
SCALE_EXP_MIN, SCALE_EXP_MAX = -126, 127
# Largest non-power-of-two encode scale: its reciprocal (the decode scale) must stay normal too.
SCALE_MIN, SCALE_MAX = 2.0 ** -126, 2.0 ** 126


def check_format(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"unknown element format {name!r}; valid: {', '.join(DTYPES)}")
    return name


def saturate_cast(x: jax.Array, fmt: str) -> jax.Array:
    """x (float32) clipped to +-max of `fmt`, then rounded RNE into `fmt`'s dtype."""
    limit = MAX[check_format(fmt)]
    return jnp.clip(x, -limit, limit).astype(DTYPES[fmt])


def pow2(exponent: jax.Array) -> jax.Array:
    """2**exponent as float32, exactly, from its bits (exponent clamped to the normal range)."""
    e = jnp.clip(exponent.astype(jnp.int32), SCALE_EXP_MIN, SCALE_EXP_MAX)
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def floor_log2(x: jax.Array) -> jax.Array:
    """floor(log2(x)) for positive normal float32 x, exactly (frexp: x = m * 2**e, m in [0.5, 1))."""
    _, e = jnp.frexp(x.astype(jnp.float32))
    return e - 1


def round_down_pow2(scale: jax.Array) -> jax.Array:
    """The largest power of two <= scale: how TE (power_2_scale) and torchao
    (round_scales_to_power_of_2) round an encode scale, so that x * scale never exceeds what the
    unrounded scale would give (no extra saturation)."""
    return pow2(floor_log2(scale))


def encode_scale(amax: jax.Array, fmt: str, margin: int = 0, power_of_2: bool = False) -> jax.Array:
    """TE / torchao encode scale: fmax / amax / 2**margin (q = x * scale). An all-zero (or
    non-finite) amax gives 1, as TE does; the result is clipped to [SCALE_MIN, SCALE_MAX]."""
    amax = amax.astype(jnp.float32)
    ok = jnp.isfinite(amax) & (amax > 0)
    safe = jnp.where(ok, amax, 1.0)
    scale = jnp.float32(MAX[check_format(fmt)]) / safe
    if margin:
        scale = scale * jnp.float32(2.0 ** -margin)
    scale = jnp.clip(scale, SCALE_MIN, SCALE_MAX)
    if power_of_2:
        scale = round_down_pow2(scale)
    return jnp.where(ok, scale, 1.0)


def e8m0_exponent(amax: jax.Array, fmt: str) -> jax.Array:
    """OCP MX spec v1.0 (section 6.3): the shared exponent floor(log2(amax)) - emax_elem, clamped
    to the float32-normal part of E8M0's range; an all-zero block gets exponent 0 (scale 1).
    Elements of the block whose scaled magnitude exceeds the format's max saturate: with E4M3,
    a block amax whose significand is above 1.75 is clipped (the spec's choice, which some
    hardware avoids by rounding the exponent up)."""
    amax = amax.astype(jnp.float32)
    ok = jnp.isfinite(amax) & (amax > 0)
    e = floor_log2(jnp.where(ok, amax, 1.0)) - EMAX[check_format(fmt)]
    return jnp.where(ok, jnp.clip(e, SCALE_EXP_MIN, SCALE_EXP_MAX), 0)


def as_e8m0(scale: jax.Array) -> jax.Array:
    """Power-of-two scales as E8M0 bytes (exact), e.g. to store or log MX scales compactly."""
    return scale.astype(jnp.float8_e8m0fnu)
