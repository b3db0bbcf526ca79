"""Quantizing one matmul operand along its contraction axis, at each granularity the recipes use.

Every quantizer takes a 2-D float array `x` [R, C] and the axis (0 or 1) that the matmul it
feeds contracts, and returns `(data, scale)`:

    data   x's shape, in the element format's dtype (float8_e4m3fn, float8_e5m2, float4_e2m1fn)
    scale  float32 DECODE scales, x ~= data * scale (Keras' convention: amax / fmax):
             tensor   (1, 1)                 one scale
             row      (R, 1) if axis=1,      one per row of the non-contracted dim (torchao
                      (1, C) if axis=0       "axiswise" along the contraction dim)
             tile     (R, ceil(C/b)) if axis=1, (ceil(R/b), C) if axis=0: 1 x b tiles along the
                      contraction axis (DeepSeek-V3 activations and gradients; TE 1D blocks)
             block2d  (ceil(R/b), ceil(C/b)): b x b blocks, whatever the axis (DeepSeek-V3 weights;
                      the same blocks serve the forward and the input-gradient matmul)
             mx       as tile; powers of two exactly representable in E8M0 (OCP MX)

A size that is not a multiple of the block is padded with zeros up to one: zeros change neither
a block's amax nor a dot product, so the last block simply holds fewer real elements, and the
result equals that of an exact tiling of the padded operand. `data` is returned unpadded.

The scale of tensor/row/tile/block2d is TE's and torchao's: encode s = fmax / amax / 2**margin,
optionally rounded down to a power of two, q = RNE(saturate(x * s)), decode = 1 / s in float32.
The mx scale is the OCP MX spec's 2**(floor(log2(amax)) - emax_elem), q = RNE(saturate(x / X)).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from . import formats

GRANULARITIES = ("tensor", "row", "tile", "block2d", "mx", "none")


@dataclass(frozen=True)
class OperandSpec:
    """How one operand of one matmul is quantized ("none": kept in high precision)."""

    granularity: str
    fmt: str = "e4m3"
    block: int = 0
    power_of_2: bool = False
    margin: int = 0

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        formats.check_format(self.fmt)
        if self.granularity in ("tile", "block2d", "mx") and self.block < 1:
            raise ValueError(f"granularity {self.granularity!r} needs a block size >= 1, got {self.block}")

    @property
    def per_output(self) -> bool:
        """Scales are constant along the contraction axis, so they factor out of the dot: the
        FP8 GEMM pattern dot(q_a, q_b) * scale_a * scale_b applies (per-tensor, rowwise)."""
        return self.granularity in ("tensor", "row")


def pad_to(x: jax.Array, axis: int, block: int) -> jax.Array:
    pad = -x.shape[axis] % block
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def to_tiles(x: jax.Array, axis: int, block: int) -> jax.Array:
    """[R, C] -> [R, C/b, b] (axis=1) or [R/b, b, C] (axis=0), padded; the block axis is axis+1."""
    x = pad_to(x, axis, block)
    r, c = x.shape
    return x.reshape((r, c // block, block) if axis == 1 else (r // block, block, c))


def to_blocks2d(x: jax.Array, block: int) -> jax.Array:
    """[R, C] -> [R/b, b, C/b, b], padded on both axes."""
    x = pad_to(pad_to(x, 0, block), 1, block)
    r, c = x.shape
    return x.reshape(r // block, block, c // block, block)


def _encode(xb: jax.Array, amax: jax.Array, spec: OperandSpec):
    """(data, decode scale) of blocks xb whose amax (broadcastable to xb) is given."""
    if spec.granularity == "mx":
        scale = formats.pow2(formats.e8m0_exponent(amax, spec.fmt))
        return formats.saturate_cast(xb / scale, spec.fmt), scale
    s = formats.encode_scale(amax, spec.fmt, spec.margin, spec.power_of_2)
    return formats.saturate_cast(xb * s, spec.fmt), jnp.float32(1.0) / s


def _blocked(x: jax.Array, spec: OperandSpec, axis: int):
    """x in its granularity's blocked view, the axes a block's amax reduces, the way back to
    x's shape, and the squeeze of keepdims scales to the documented layout."""
    g, b = spec.granularity, spec.block
    r, c = x.shape
    if g == "none":
        raise ValueError("granularity 'none' keeps the operand in high precision: nothing to quantize")
    if g in ("tensor", "row"):
        return x, (0, 1) if g == "tensor" else (axis,), lambda v: v, lambda v: v
    if g in ("tile", "mx"):
        xb = to_tiles(x, axis, b)
        back = (lambda v: v.reshape(xb.shape[0], -1)[:r, :c]) if axis == 1 else (lambda v: v.reshape(-1, c)[:r, :c])
        return xb, (axis + 1,), back, lambda v: jnp.squeeze(v, axis + 1)
    xb = to_blocks2d(x, b)
    return xb, (1, 3), lambda v: v.reshape(xb.shape[0] * b, xb.shape[2] * b)[:r, :c], lambda v: v[:, 0, :, 0]


def _quantize_blocked(x: jax.Array, spec: OperandSpec, axis: int):
    if x.ndim != 2 or axis not in (0, 1):
        raise ValueError(f"quantizers take a 2-D operand and axis 0 or 1, got shape {x.shape}, axis {axis}")
    xb, axes, back, squeeze = _blocked(x.astype(jnp.float32), spec, axis)
    amax = jnp.max(jnp.abs(xb), axis=axes, keepdims=True)
    data, scale = _encode(xb, amax, spec)
    return data, scale, amax, back, squeeze


def quantize_with_amax(x: jax.Array, spec: OperandSpec, axis: int):
    """(data, decode scale, amax per scale) in the layout of the module docstring."""
    data, scale, amax, back, squeeze = _quantize_blocked(x, spec, axis)
    return back(data), squeeze(scale), squeeze(amax)


def fake_quantize_with_amax(x: jax.Array, spec: OperandSpec, axis: int):
    """(float32 quantize-dequantized x, decode scale, amax per scale): dequantized in the blocked
    view, so no scale is repeated out to x's shape (XLA fuses the chain)."""
    data, scale, amax, back, squeeze = _quantize_blocked(x, spec, axis)
    return back(data.astype(jnp.float32) * scale), squeeze(scale), squeeze(amax)


def quantize(x: jax.Array, spec: OperandSpec, axis: int):
    """(data, decode scale) of x for a matmul that contracts its `axis`."""
    data, scale, _ = quantize_with_amax(x, spec, axis)
    return data, scale


def expand_scale(scale: jax.Array, spec: OperandSpec, axis: int, shape: tuple[int, int]) -> jax.Array:
    """Decode scales broadcast back to the operand's shape (padding sliced off)."""
    g, b = spec.granularity, spec.block
    if g in ("tensor", "row"):
        return scale
    if g == "block2d" or axis == 0:
        scale = jnp.repeat(scale, b, axis=0)
    if g == "block2d" or axis == 1:
        scale = jnp.repeat(scale, b, axis=1)
    return scale[: shape[0], : shape[1]]


def dequantize(data: jax.Array, scale: jax.Array, spec: OperandSpec, axis: int) -> jax.Array:
    """float32 values data * scale."""
    return data.astype(jnp.float32) * expand_scale(scale, spec, axis, data.shape)


def fake_quantize(x: jax.Array, spec: OperandSpec, axis: int) -> jax.Array:
    """Quantize-dequantize: what the recipe makes of x, as float32."""
    return fake_quantize_with_amax(x, spec, axis)[0]
