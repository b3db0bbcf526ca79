"""The quantized matmul: a `jax.custom_vjp` whose forward and both backward matmuls quantize
their operands as the recipe's Plan says (recipe.py), each along its own contraction axis.

Per-tensor and rowwise operands have scales that are constant along the contraction axis, so
the dot runs on the FP8 values themselves and the scales multiply its float32 result:
`dot_general(q_a(f8), q_b(f8), preferred_element_type=float32) * scale_a * scale_b`, the pattern
XLA's GemmRewriter turns into a cuBLASLt FP8 GEMM on Hopper (on CPU XLA upcasts; same cost).
Block and MX operands' scales vary along the contraction axis: they are dequantized and the dot
is float32 at HIGHEST precision (emulation), or bf16 accumulating in float32 where the dequantized
values are exactly bfloat16 (power-of-2 and E8M0 scales: `exact_in_bfloat16`). The exception is MX with 32-element blocks on a GPU
of compute capability 10+ (Blackwell): there the FP8 data and E8M0 scales go to
`jax.nn.scaled_matmul`, cuDNN's block-scaled GEMM (`native_block_scaled`); JAX lowers it for
no other platform.
Quantizers are reshape-based, so the whole chain fuses into the jitted step; residuals are the
high-precision X and W, as for a plain Dense, and the backward re-quantizes them.

EinsumDense: equations where every index is in exactly two of (input, kernel, output), i.e.
free input dims (M), contracted dims (K) and free kernel dims (N), with no batch dims, no
ellipsis and no index summed within one operand. They reduce to X [M, K] @ W [K, N] by
transposes and reshapes (none for Keras' and keras-hub's projections): a contraction over
several dims (heads x head_dim) is blocked along their flattening in the input's index order.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .quantize import OperandSpec, fake_quantize_with_amax, pad_to, quantize_with_amax
from .plan import Plan, plan
from .recipe import Recipe
from .stats import COLUMNS, scale_statistics

RECORD_TENSORS = ("inputs", "kernel", "outputs_grad")
RECORD_SHAPE = (len(RECORD_TENSORS), len(COLUMNS))
"""The record of one layer's step: a row of stats.COLUMNS for the forward X and W scales and the
dgrad dY scales, returned as the cotangent of a `record` input (layers.py)."""


MX_BLOCK = 32
"""The block size of cuDNN's block-scaled MXFP8 GEMM."""


@functools.cache
def block_scaled_gemms() -> bool:
    """Does this machine's first device run MXFP8 GEMMs (jax.nn.scaled_matmul)? Blackwell, CC 10+."""
    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", 0) or 0) >= 10


def native_block_scaled(a_spec: OperandSpec, b_spec: OperandSpec) -> bool:
    """Both operands MX in 32-element blocks on a GPU that runs those GEMMs: no emulation."""
    mx = all(spec.granularity == "mx" and spec.block == MX_BLOCK for spec in (a_spec, b_spec))
    return mx and block_scaled_gemms()


def contraction_last(x: jax.Array, spec: OperandSpec, axis: int):
    """x quantized MX along `axis`, as jax.nn.scaled_matmul takes an operand: FP8 data [free, K]
    zero-padded to whole blocks and its E8M0 scales [free, K / block]; and the decode scales and
    amaxes in quantize.py's layout (for the scale statistics)."""
    data, scale, amax = quantize_with_amax(x, spec, axis)
    if axis == 0:
        data, blocks = data.T, scale.T
    else:
        blocks = scale
    data = pad_to(data, 1, spec.block)
    return data, blocks.astype(jnp.float8_e8m0fnu), scale, amax


def exact_in_bfloat16(spec: OperandSpec) -> bool:
    """Dequantized values an FP8 number (at most 3 mantissa bits) times a power of two (MX's E8M0,
    or power-of-2 scales): exactly bfloat16 (7 mantissa bits, float32's exponent range), so a bf16
    dot accumulating in float32 forms the same products as a float32 one, about 2x faster on a CPU."""
    return spec.granularity == "mx" or spec.power_of_2


def _dot(a, a_axis: int, a_spec: OperandSpec, b, b_axis: int, b_spec: OperandSpec, track: bool):
    """a contracted on a_axis with b on b_axis -> [a_free, b_free] float32, and scale stats."""
    dims = (((a_axis,), (b_axis,)), ((), ()))
    if a_spec.granularity == "none" or b_spec.granularity == "none":
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32), None, None
    if a_spec.per_output and b_spec.per_output:
        qa, sa, ma = quantize_with_amax(a, a_spec, a_axis)
        qb, sb, mb = quantize_with_amax(b, b_spec, b_axis)
        out = jax.lax.dot_general(qa, qb, dims, preferred_element_type=jnp.float32)
        out = out * sa.reshape(-1, 1) * sb.reshape(1, -1)
    elif native_block_scaled(a_spec, b_spec):
        qa, ea, sa, ma = contraction_last(a, a_spec, a_axis)
        qb, eb, sb, mb = contraction_last(b, b_spec, b_axis)
        out = jax.nn.scaled_matmul(qa[None], qb[None], ea[None], eb[None], preferred_element_type=jnp.float32)[0]
    else:
        da, sa, ma = fake_quantize_with_amax(a, a_spec, a_axis)
        db, sb, mb = fake_quantize_with_amax(b, b_spec, b_axis)
        if exact_in_bfloat16(a_spec) and exact_in_bfloat16(b_spec):  # the same products, at bf16's dot speed
            out = jax.lax.dot_general(da.astype(jnp.bfloat16), db.astype(jnp.bfloat16), dims,
                                      preferred_element_type=jnp.float32)
        else:
            out = jax.lax.dot_general(da, db, dims, precision=jax.lax.Precision.HIGHEST,
                                      preferred_element_type=jnp.float32)
    if not track:
        return out, None, None
    return out, scale_statistics(sa, ma, a_spec), scale_statistics(sb, mb, b_spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul(x, w, record, p: Plan, track: bool):
    y, _, _ = _dot(x, 1, p.fwd_x, w, 0, p.fwd_w, False)
    return y.astype(jnp.result_type(x, w))


def _matmul_fwd(x, w, record, p: Plan, track: bool):
    y, stats_x, stats_w = _dot(x, 1, p.fwd_x, w, 0, p.fwd_w, track)
    return y.astype(jnp.result_type(x, w)), (x, w, stats_x, stats_w)


def _matmul_bwd(p: Plan, track: bool, residuals, dy):
    x, w, stats_x, stats_w = residuals
    dx, stats_dy, _ = _dot(dy, 1, p.dgrad_dy, w, 1, p.dgrad_w, track)  # dY @ W^T, contracts N
    dw, _, _ = _dot(x, 0, p.wgrad_x, dy, 0, p.wgrad_dy, False)       # X^T @ dY, contracts M
    record = jnp.stack([stats_x, stats_w, stats_dy]) if track else jnp.zeros(RECORD_SHAPE, jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype), record


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _plan(recipe: Recipe | Plan) -> Plan:
    return recipe if isinstance(recipe, Plan) else plan(recipe)


def quantized_matmul(x: jax.Array, w: jax.Array, recipe: Recipe | Plan, record: jax.Array | None = None):
    """x [..., K] @ w [K, N] under the recipe, differentiable (custom VJP). With `record`
    (float32 RECORD_SHAPE, e.g. a variable's value), its gradient is this step's scale stats."""
    k, n = w.shape
    track = record is not None
    record = record if track else jnp.zeros(RECORD_SHAPE, jnp.float32)
    y = _matmul(x.reshape(-1, k), w, record, _plan(recipe), track)
    return y.reshape(*x.shape[:-1], n)


class UnsupportedEquation(ValueError):
    """An EinsumDense equation the recipes do not reduce to a 2-D matmul; says why."""


@dataclass(frozen=True)
class EinsumLayout:
    inputs: str
    kernel: str
    output: str
    m: str  # free input indices, in input order
    k: str  # contracted indices, in input order
    n: str  # free kernel indices, in kernel order


def einsum_layout(equation: str) -> EinsumLayout:
    match = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]*)", equation.replace(" ", ""))
    if not match:
        raise UnsupportedEquation(f"{equation!r}: only 'input,kernel->output' with letter indices (no ...)")
    a, b, out = match.groups()
    for part in (a, b, out):
        if len(set(part)) != len(part):
            raise UnsupportedEquation(f"{equation!r}: repeated index in {part!r}")
    for c in set(a + b + out):
        if (c in a) + (c in b) + (c in out) != 2:
            why = "a batch index (in input, kernel and output)" if c in a and c in b else "summed within one operand"
            raise UnsupportedEquation(f"{equation!r}: index {c!r} is {why}")
    k = "".join(c for c in a if c in b)
    if not k:
        raise UnsupportedEquation(f"{equation!r}: nothing is contracted")
    return EinsumLayout(a, b, out, "".join(c for c in a if c in out), k, "".join(c for c in b if c in out))


def einsum_dims(equation: str, kernel_shape) -> tuple[int, int]:
    """(K, N) of the 2-D matmul an EinsumDense kernel of this shape amounts to."""
    lay = einsum_layout(equation)
    size = dict(zip(lay.kernel, kernel_shape))
    return math.prod(size[c] for c in lay.k), math.prod(size[c] for c in lay.n)


def quantized_einsum(equation: str, x: jax.Array, w: jax.Array, recipe: Recipe | Plan,
                     record: jax.Array | None = None) -> jax.Array:
    """jnp.einsum(equation, x, w) through quantized_matmul (see the module docstring)."""
    lay = einsum_layout(equation)
    size = {**dict(zip(lay.inputs, x.shape)), **dict(zip(lay.kernel, w.shape))}
    x2 = jnp.transpose(x, [lay.inputs.index(c) for c in lay.m + lay.k])
    x2 = x2.reshape(math.prod(size[c] for c in lay.m), math.prod(size[c] for c in lay.k))
    w2 = jnp.transpose(w, [lay.kernel.index(c) for c in lay.k + lay.n])
    w2 = w2.reshape(x2.shape[1], math.prod(size[c] for c in lay.n))
    y = quantized_matmul(x2, w2, recipe, record)
    y = y.reshape([size[c] for c in lay.m + lay.n])
    return jnp.transpose(y, [(lay.m + lay.n).index(c) for c in lay.output])
