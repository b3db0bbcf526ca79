"""NVFP4, for what-if numerics only (not a training recipe here): E2M1 data, one E4M3 decode
scale per 16 elements along the contraction axis, and one float32 scale per tensor that maps the
block scales into E4M3's range (NVIDIA's two-level scaling, as in Transformer Engine's NVFP4
recipe and cuBLAS' block-scaled FP4 GEMMs):

    tensor_scale = 6 * 448 / amax(x)                     (float32; 1 for an all-zero tensor)
    block_scale  = e4m3(saturate(amax(block) / 6 * tensor_scale))
    data         = e2m1(saturate(x * (tensor_scale / block_scale)))   (0 where block_scale is 0)
    x ~= data * block_scale / tensor_scale

Rounding is RNE and saturating, as everywhere (formats.py). Layout as quantize.py's `tile`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import formats
from .quantize import OperandSpec, to_tiles, expand_scale

BLOCK = 16


def quantize_nvfp4(x: jax.Array, axis: int, block: int = BLOCK):
    """(data float4_e2m1fn, block_scale float8_e4m3fn [tile layout], tensor_scale float32 ())."""
    x = x.astype(jnp.float32)
    r, c = x.shape
    amax = jnp.max(jnp.abs(x))
    ok = jnp.isfinite(amax) & (amax > 0)
    tensor_scale = jnp.float32(formats.MAX["e2m1"] * formats.MAX["e4m3"]) / jnp.where(ok, amax, 1.0)
    tensor_scale = jnp.where(ok, jnp.clip(tensor_scale, formats.SCALE_MIN, formats.SCALE_MAX), 1.0)
    xb = to_tiles(x, axis, block)
    block_amax = jnp.max(jnp.abs(xb), axis=axis + 1, keepdims=True)
    block_scale = formats.saturate_cast(block_amax / jnp.float32(formats.MAX["e2m1"]) * tensor_scale, "e4m3")
    decode = block_scale.astype(jnp.float32)
    encode = jnp.where(decode > 0, tensor_scale / jnp.where(decode > 0, decode, 1.0), 0.0)
    data = formats.saturate_cast(xb * encode, "e2m1")
    data = data.reshape(xb.shape[0], -1) if axis == 1 else data.reshape(-1, c)
    return data[:r, :c], jnp.squeeze(block_scale, axis + 1), tensor_scale


def dequantize_nvfp4(data, block_scale, tensor_scale, axis: int, block: int = BLOCK) -> jax.Array:
    spec = OperandSpec("tile", "e4m3", block)
    scale = expand_scale(block_scale.astype(jnp.float32), spec, axis, data.shape)
    return data.astype(jnp.float32) * scale / tensor_scale


def fake_quantize_nvfp4(x: jax.Array, axis: int, block: int = BLOCK) -> jax.Array:
    return dequantize_nvfp4(*quantize_nvfp4(x, axis, block), axis, block)
