"""FP8 recipes (fp8exp/precision/recipes) against independent NumPy references written from the
specs (TE / torchao scales, DeepSeek-V3 tiles and blocks, OCP MX E8M0 exponents, NVFP4's two
levels): quantized operands bit for bit, the Keras layers' outputs and all three gradients within
a tight tolerance of float64 matmuls, and the recipes differing where they should."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import keras
import ml_dtypes
import numpy as np
import pytest

from fp8exp.precision.recipes import formats, nvfp4, quantize, stats
from fp8exp.precision.recipes.layers import RecipeDense, RecipeEinsumDense, apply_recipe, scale_metrics
from fp8exp.precision.recipes.matmul import RECORD_SHAPE, UnsupportedEquation, quantized_einsum
from fp8exp.precision.recipes.plan import plan
from fp8exp.precision.recipes.recipe import indivisible, make_recipe

F32 = np.float32
FORMATS = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 8), "e5m2": (ml_dtypes.float8_e5m2, 57344.0, 15)}

# ---------------------------------------------------------------- the reference, from the specs

# Per recipe: (granularity, format) of fwd X, fwd W, dgrad dY, dgrad W, wgrad X, wgrad dY; each
# operand along the contraction axis of its own matmul. "g" is the recipe's gradient format.
SPEC = {
    "current": [("tensor", "e4m3"), ("tensor", "e4m3"), ("tensor", "g"), ("tensor", "e4m3"), ("tensor", "e4m3"), ("tensor", "g")],
    "rowwise": [("row", "e4m3"), ("row", "e4m3"), ("row", "g"), ("row", "e4m3"), ("row", "e4m3"), ("row", "g")],
    "rowwise_gw_hp": [("row", "e4m3"), ("row", "e4m3"), ("row", "g"), ("tensor", "e4m3"), None, None],
    "block": [("tile", "e4m3"), ("block2d", "e4m3"), ("tile", "g"), ("block2d", "e4m3"), ("tile", "e4m3"), ("tile", "g")],
    "mxfp8": [("mx", "e4m3"), ("mx", "e4m3"), ("mx", "g"), ("mx", "e4m3"), ("mx", "e4m3"), ("mx", "g")],
}
AXES = [1, 0, 1, 1, 0, 0]  # X [M,K] @ W [K,N]; dY [M,N] @ W^T; X^T @ dY
REF_OPTIONS = {  # the anchors' defaults: grad format, power-of-2 scales, block
    "current": ("e5m2", False, 0), "rowwise": ("e4m3", True, 0), "rowwise_gw_hp": ("e4m3", True, 0),
    "block": ("e4m3", True, 128), "mxfp8": ("e4m3", True, 32),
}


def ref_floor_pow2(s):
    """TE's power-of-2 rounding: keep the sign and exponent bits of the float32, drop the mantissa."""
    return (np.asarray(s, F32).view(np.uint32) & np.uint32(0xFF800000)).view(F32)


def ref_exponent(v):
    """floor(log2(v)) of a positive normal float32 from its biased exponent bits."""
    return int((np.asarray(v, F32).view(np.uint32) >> 23) & 0xFF) - 127


def ref_cast(v, fmt):
    dtype, fmax, _ = FORMATS[fmt]
    return np.clip(np.asarray(v, F32), -fmax, fmax).astype(dtype)  # saturate, then RNE (ml_dtypes)


def ref_block(values, fmt, mx, margin=0, pow2=False):
    """One scaling block: (quantized values, decode scale)."""
    dtype, fmax, emax = FORMATS[fmt]
    amax = F32(np.max(np.abs(values)))
    if mx:  # OCP MX v1.0: X = 2^(floor(log2 amax) - emax_elem); an all-zero block: X = 1
        e = 0 if amax == 0 else min(max(ref_exponent(amax) - emax, -126), 127)
        scale = F32(2.0 ** e)
        return ref_cast(values / scale, fmt), scale
    if amax == 0:
        s = F32(1)
    else:  # TE / torchao: s = fmax / amax / 2^margin, rounded down to a power of two
        with np.errstate(over="ignore"):  # a tiny amax: inf, clipped to the largest scale below
            s = F32(F32(fmax) / amax) * F32(2.0 ** -margin)
        s = F32(min(max(s, 2.0 ** -126), 2.0 ** 126))
        s = ref_floor_pow2(s) if pow2 else s
    return ref_cast(values * s, fmt), F32(1) / s


def ref_quantize(x, granularity, fmt, axis, block=0, margin=0, pow2=False):
    """(data, decode scales) with explicit loops over the blocks of x [R, C], axis contracted."""
    x = np.asarray(x, F32)
    mx = granularity == "mx"
    q = np.zeros(x.shape, FORMATS[fmt][0])
    if granularity == "tensor":
        q[...], scale = ref_block(x, fmt, mx, margin, pow2)
        return q, np.full((1, 1), scale, F32)
    if granularity == "block2d":
        scales = np.zeros((math.ceil(x.shape[0] / block), math.ceil(x.shape[1] / block)), F32)
        for i in range(scales.shape[0]):
            for j in range(scales.shape[1]):
                rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
                q[rows, cols], scales[i, j] = ref_block(x[rows, cols], fmt, mx, margin, pow2)
        return q, scales
    xt, qt = (x, q) if axis == 1 else (x.T, q.T)  # contract along the last axis of xt
    size = xt.shape[1] if granularity == "row" else block
    scales = np.zeros((xt.shape[0], math.ceil(xt.shape[1] / size)), F32)
    for r in range(xt.shape[0]):
        for j in range(scales.shape[1]):
            cols = slice(j * size, (j + 1) * size)
            qt[r, cols], scales[r, j] = ref_block(xt[r, cols], fmt, mx, margin, pow2)
    return q, (scales if axis == 1 else scales.T)


def ref_dequantize(q, scales, granularity, axis, block):
    """float64 values."""
    if granularity in ("tensor", "row"):
        return q.astype(np.float64) * scales.astype(np.float64)
    rep0 = block if granularity == "block2d" or axis == 0 else 1
    rep1 = block if granularity == "block2d" or axis == 1 else 1
    full = np.repeat(np.repeat(scales.astype(np.float64), rep0, axis=0), rep1, axis=1)
    return q.astype(np.float64) * full[: q.shape[0], : q.shape[1]]


def ref_operand(recipe, index, value):
    """The recipe's operand number `index` (see SPEC) as float64, quantized-dequantized."""
    spec = SPEC[recipe][index]
    if spec is None:
        return np.asarray(value, np.float64)
    grad, pow2, block = REF_OPTIONS[recipe]
    fmt = grad if spec[1] == "g" else spec[1]
    q, scales = ref_quantize(value, spec[0], fmt, AXES[index], block, 0, pow2 and spec[0] != "mx")
    return ref_dequantize(q, scales, spec[0], AXES[index], block)


def ref_linear(recipe, x, w, dy):
    y = ref_operand(recipe, 0, x) @ ref_operand(recipe, 1, w)
    dx = ref_operand(recipe, 2, dy) @ ref_operand(recipe, 3, w).T
    dw = ref_operand(recipe, 4, x).T @ ref_operand(recipe, 5, dy)
    return y, dx, dw


# ---------------------------------------------------------------- data with planted outliers


def operands(seed=0, m=96, k=256, n=192):
    """X, W, dY; N=192 and M=96 are not multiples of 128, so block recipes pad."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(F32)
    x[5] *= 50                 # an outlier row
    x[3, 17] = 300.0           # a local outlier
    x[9, :40] *= 1e-3          # tiny values: E4M3 subnormals
    w = (rng.standard_normal((k, n)) * 0.05).astype(F32)
    w[10, 100] = 8.0
    dy = (rng.standard_normal((m, n)) * 1e-3).astype(F32)
    dy[7] *= 100
    dy[11] = 0.0               # a masked token: all-zero blocks
    return x, w, dy


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


def close(actual, expected, tol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.max(np.abs(actual - expected))
    assert err <= tol * np.max(np.abs(expected)), f"max error {err:.3g}, max |ref| {np.max(np.abs(expected)):.3g}"


def sqnr_db(reference, approx):
    reference = np.asarray(reference, np.float64)
    noise = np.sum((reference - np.asarray(approx, np.float64)) ** 2)
    return 10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-300))


# ---------------------------------------------------------------- formats


def test_e2m1_rounding_is_rne_and_saturating():
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])  # OCP FP4 E2M1 magnitudes; code i has mantissa bit i & 1
    values = np.concatenate([np.linspace(-8, 8, 4001), (grid[1:] + grid[:-1]) / 2, -(grid[1:] + grid[:-1]) / 2])
    expected = []
    for v in values:
        distance = np.abs(grid - min(abs(v), 6.0))
        nearest = np.flatnonzero(distance == distance.min())
        expected.append(np.copysign(grid[nearest[0] if len(nearest) == 1 or nearest[0] % 2 == 0 else nearest[1]], v))
    actual = np.asarray(formats.saturate_cast(jnp.asarray(values, jnp.float32), "e2m1").astype(jnp.float32))
    np.testing.assert_array_equal(np.abs(actual), np.abs(expected))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_rounding_matches_ml_dtypes_on_ties_subnormals_and_overflow(fmt):
    dtype, fmax, _ = FORMATS[fmt]
    finite = np.unique(np.arange(256, dtype=np.uint8).view(dtype).astype(F32))
    finite = finite[np.isfinite(finite)]
    ties = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(F32)
    values = np.concatenate([finite, ties, np.nextafter(ties, F32(0)), [fmax * 1.2, -fmax * 3, np.inf]]).astype(F32)
    actual = np.asarray(formats.saturate_cast(jnp.asarray(values), fmt))
    np.testing.assert_array_equal(bits(actual), bits(ref_cast(values, fmt)))


def test_power_of_2_and_e8m0_scales_from_their_bits():
    rng = np.random.default_rng(1)
    values = np.exp(rng.uniform(-80, 80, 5000)).astype(F32)
    down = np.asarray(formats.round_down_pow2(jnp.asarray(values)))
    np.testing.assert_array_equal(bits(down), bits(ref_floor_pow2(values)))
    exponents = np.asarray(formats.e8m0_exponent(jnp.asarray(values), "e4m3"))
    np.testing.assert_array_equal(exponents, [ref_exponent(v) - 8 for v in values])
    scales = np.asarray(formats.pow2(jnp.asarray(exponents)))
    np.testing.assert_array_equal(scales, np.asarray(scales).astype(ml_dtypes.float8_e8m0fnu).astype(F32))


# ---------------------------------------------------------------- quantizers, bit for bit


@pytest.mark.parametrize("recipe", list(SPEC))
def test_quantized_operands_are_bit_exact(recipe):
    x, w, dy = operands()
    steps = plan(make_recipe(recipe))
    specs = [steps.fwd_x, steps.fwd_w, steps.dgrad_dy, steps.dgrad_w, steps.wgrad_x, steps.wgrad_dy]
    values = [x, w, dy, w, x, dy]
    quantized = [i for i, spec in enumerate(specs) if spec.granularity != "none"]
    assert quantized == [i for i, spec in enumerate(SPEC[recipe]) if spec is not None]
    def quantize_all(*v):
        out = [quantize.quantize(v[i], specs[i], AXES[i]) for i in quantized]
        return [(q, s, quantize.dequantize(q, s, specs[i], AXES[i])) for i, (q, s) in zip(quantized, out)]
    results = jax.jit(quantize_all)(*values)
    grad, pow2, block = REF_OPTIONS[recipe]
    for index, (data, scale, dequantized) in zip(quantized, results):
        granularity, fmt = SPEC[recipe][index]
        fmt = grad if fmt == "g" else fmt
        ref_data, ref_scale = ref_quantize(values[index], granularity, fmt, AXES[index], block, 0,
                                           pow2 and granularity != "mx")
        assert np.asarray(data).dtype == ref_data.dtype, (index, specs[index])
        np.testing.assert_array_equal(bits(data), bits(ref_data), err_msg=f"operand {index}: {specs[index]}")
        np.testing.assert_array_equal(bits(scale), bits(ref_scale), err_msg=f"operand {index} scales: {specs[index]}")
        np.testing.assert_allclose(dequantized, ref_dequantize(ref_data, ref_scale, granularity, AXES[index], block),
                                   rtol=1e-7)


@pytest.mark.parametrize("margin", [0, 2])
def test_current_scaling_margin_and_power_of_2_options(margin):
    x, _, _ = operands()
    for pow2 in (False, True):
        spec = plan(make_recipe("current", margin=margin, power_of_2_scales=pow2)).fwd_x
        data, scale = quantize.quantize(jnp.asarray(x), spec, 1)
        ref_data, ref_scale = ref_quantize(x, "tensor", "e4m3", 1, 0, margin, pow2)
        np.testing.assert_array_equal(bits(data), bits(ref_data))
        np.testing.assert_array_equal(bits(scale), bits(ref_scale))


def test_nvfp4_two_level_scales_are_bit_exact():
    x, _, _ = operands()
    data, block_scale, tensor_scale = nvfp4.quantize_nvfp4(jnp.asarray(x), axis=1)
    s_enc = F32(F32(6 * 448) / F32(np.max(np.abs(x))))  # per-tensor FP32 scale
    ref_data = np.zeros(x.shape, ml_dtypes.float4_e2m1fn)
    ref_scales = np.zeros((x.shape[0], x.shape[1] // 16), ml_dtypes.float8_e4m3fn)
    for r in range(x.shape[0]):
        for j in range(ref_scales.shape[1]):
            block = x[r, 16 * j: 16 * j + 16]
            ref_scales[r, j] = ref_cast(F32(np.max(np.abs(block)) / F32(6)) * s_enc, "e4m3")
            decode = F32(ref_scales[r, j])
            encode = s_enc / decode if decode > 0 else F32(0)
            ref_data[r, 16 * j: 16 * j + 16] = np.clip(block * encode, -6, 6).astype(ml_dtypes.float4_e2m1fn)
    assert float(tensor_scale) == s_enc
    restored = np.asarray(nvfp4.dequantize_nvfp4(data, block_scale, tensor_scale, axis=1))
    np.testing.assert_allclose(restored, np.repeat(ref_scales.astype(F32), 16, axis=1) * ref_data.astype(F32) / s_enc,
                               rtol=1e-6)
    np.testing.assert_array_equal(bits(block_scale), bits(ref_scales))
    np.testing.assert_array_equal(np.asarray(data).astype(F32), ref_data.astype(F32))


def test_block_scale_statistics_leave_out_zero_blocks_and_count_scales_at_their_bounds():
    x = np.random.default_rng(4).standard_normal((4, 256)).astype(F32)
    x[0, :128] *= 1e-37  # amax ~1e-37: the encode scale 448 / amax is clipped at 2**126
    x[1] = 0.0           # two all-zero tiles (scale 1 by convention)
    for recipe, block in (("block", 128), ("mxfp8", 32)):
        spec = plan(make_recipe(recipe)).fwd_x
        stats_row = np.asarray(jax.jit(lambda v: stats.scale_statistics(*quantize.quantize_with_amax(v, spec, 1)[1:], spec))(x))
        _, ref_scales = ref_quantize(x, spec.granularity, "e4m3", 1, block, 0, recipe == "block")
        amax = np.abs(x).reshape(4, -1, block).max(axis=2)
        live = ref_scales[amax > 0]
        at_bound = {"block": 1 / live.size, "mxfp8": 4 / live.size}[recipe]  # MX: X = 2**-126 when amax < 2**-118
        expected = [live.min(), live.max(), np.median(live), at_bound, 1 - live.size / amax.size, np.abs(x).max()]
        np.testing.assert_allclose(stats_row, expected, rtol=1e-6, err_msg=recipe)


# ---------------------------------------------------------------- the layers' matmuls


def layer_vjp(layer, x, dy):
    """Output and gradients (inputs, kernel, record) of a recipe layer, through Keras, in one jit."""
    def run(inputs, kernel, record):
        outputs, _ = layer.stateless_call([kernel, record] if layer.track_scales else [kernel], [], inputs)
        return outputs

    def outputs_and_gradients(inputs, kernel, record, cotangent):
        y, backward = jax.vjp(run, inputs, kernel, record)
        return (y, *backward(cotangent))
    return jax.jit(outputs_and_gradients)(x, layer.kernel.value, jnp.zeros(RECORD_SHAPE), dy)


@pytest.mark.parametrize("recipe", list(SPEC))
def test_dense_output_and_gradients_match_the_reference(recipe):
    x, w, dy = operands()
    track = recipe in ("current", "block")  # the record costs compile time: two recipes check it
    layer = RecipeDense(w.shape[1], use_bias=False, recipe=make_recipe(recipe), track_scales=track)
    layer.build((None, w.shape[0]))
    layer.kernel.assign(w)
    y, dx, dw, record = layer_vjp(layer, x, dy)
    ref_y, ref_dx, ref_dw = ref_linear(recipe, x, w, dy)
    close(y, ref_y)
    close(dx, ref_dx)
    close(dw, ref_dw)
    if not track:
        return
    record = np.asarray(record)  # this step's scale stats: forward X, W, dgrad dY
    assert record[0, 5] == np.max(np.abs(x)) and record[2, 5] == np.max(np.abs(dy))
    assert record[2, 4] == pytest.approx(0 if recipe == "current" else 1 / 96, rel=1e-6)  # dY row 11 is all zero


def test_einsum_dense_with_a_multi_dim_kernel_matches_the_2d_reference():
    x, w, dy = operands()
    layer = RecipeEinsumDense("abc,cde->abde", (48, 3, 64), recipe=make_recipe("block"), track_scales=False)
    layer.build((2, 48, 256))
    layer.kernel.assign(w.reshape(256, 3, 64))
    y, dx, dw, _ = layer_vjp(layer, x.reshape(2, 48, 256), dy.reshape(2, 48, 3, 64))
    ref_y, ref_dx, ref_dw = ref_linear("block", x, w, dy)
    close(np.reshape(y, (96, 192)), ref_y)
    close(np.reshape(dx, (96, 256)), ref_dx)
    close(np.reshape(dw, (256, 192)), ref_dw)


def test_unsupported_equations_are_named_and_left_in_high_precision():
    with pytest.raises(UnsupportedEquation, match="batch index"):
        quantized_einsum("abc,acd->abd", jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), make_recipe("rowwise"))
    inputs = keras.Input((3, 4))
    layer = keras.layers.EinsumDense("abc,acd->abd", (3, 5), name="batched")
    layer.build((2, 3, 4))
    applied = apply_recipe([layer, keras.layers.Dense(4, name="unbuilt")], make_recipe("rowwise"))
    assert inputs is not None and applied.layers == []
    assert "batch index" in applied.high_precision["batched"] and applied.high_precision["unbuilt"] == "not built"
    assert type(layer) is keras.layers.EinsumDense


def test_recipe_options_and_indivisible_blocks_are_reported():
    with pytest.raises(ValueError, match="unknown FP8 recipe 'tensorwise'; valid: current"):
        make_recipe("tensorwise")
    with pytest.raises(ValueError, match="recipe 'mxfp8' does not take margin; its options: block_size, grad_format"):
        make_recipe("mxfp8", margin=1)
    assert make_recipe("block", block_size=None).block_size == 128
    assert indivisible(make_recipe("current"), 100, 7) == []
    assert indivisible(make_recipe("block"), 256, 192) == [
        "output dim 192 is not a multiple of block_size 128: padded with zeros to 256"]
    assert [p.split(" is")[0] for p in indivisible(make_recipe("mxfp8"), 200, 48)] == ["contraction dim 200", "output dim 48"]
    with pytest.raises(ValueError, match="what-if numerics only"):
        plan(make_recipe("nvfp4"))


# ---------------------------------------------------------------- the recipes differ where they should


def forward_view(recipe, x):
    """What the recipe's forward pass makes of an activation x [M, K] (contracted along K)."""
    spec = plan(make_recipe(recipe)).fwd_x
    return np.asarray(jax.jit(lambda v: quantize.fake_quantize(v, spec, 1))(x))


def test_one_outlier_row_ruins_a_tensorwise_scale_but_not_a_rowwise_one():
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(F32)
    spiked = x.copy()
    spiked[0] *= 1e5  # its amax pushes the other rows below E4M3's subnormals under one scale
    rest = slice(1, None)
    current_clean, current_spiked = (sqnr_db(v[rest], forward_view("current", v)[rest]) for v in (x, spiked))
    assert current_clean > 28 and current_spiked < 10, (current_clean, current_spiked)
    rowwise_spiked = forward_view("rowwise", spiked)[rest]
    np.testing.assert_array_equal(rowwise_spiked, forward_view("rowwise", x)[rest])  # the other rows are untouched
    assert sqnr_db(x[rest], rowwise_spiked) > 28


def test_block_and_mx_scales_contain_a_local_outlier_that_ruins_current():
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(F32)
    x[5, 40] = 1e6
    others = np.ones(x.shape, bool)
    others[5, 40] = False
    db = {recipe: sqnr_db(x[others], forward_view(recipe, x)[others]) for recipe in ("current", "block", "mxfp8")}
    assert db["current"] < 10 and db["block"] > db["current"] + 15 and db["mxfp8"] > db["block"] + 3, db
    row = others[5]  # the outlier's row: 1 x 128 tiles lose 127 neighbours, 32-element MX blocks 31
    row_db = {recipe: sqnr_db(x[5, row], forward_view(recipe, x)[5, row]) for recipe in ("block", "mxfp8")}
    assert row_db["mxfp8"] > row_db["block"] + 3, row_db


# ---------------------------------------------------------------- on a built Keras model


def tiny_model():
    inputs = keras.Input((8, 64))
    h = keras.layers.Dense(128, activation="relu", name="up")(inputs)
    h = keras.layers.EinsumDense("abc,cde->abde", (8, 4, 32), name="heads")(h)
    h = keras.layers.Reshape((8, 128))(h)
    h = keras.layers.EinsumDense("abc,cd->abd", (8, 64), bias_axes="d", name="down")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


LAYER_RECIPES = {"up": "block", "heads": "mxfp8", "down": "rowwise_gw_hp", "head": "current"}


def test_recipes_train_report_their_scales_and_survive_save_and_load(tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_model()
    for name, recipe in LAYER_RECIPES.items():
        applied = apply_recipe([model.get_layer(name)], make_recipe(recipe))
        assert applied.layers == [name] and not applied.high_precision
    assert applied.padded == {} and apply_recipe([model.get_layer("up")], make_recipe("block")).padded == {
        "up": ["contraction dim 64 is not a multiple of block_size 128: padded with zeros to 128"]}
    x = np.random.default_rng(0).standard_normal((128, 8, 64)).astype(F32)
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int32")
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history["loss"]
    assert losses[-1] < losses[0] - 0.05, losses

    for name, recipe in LAYER_RECIPES.items():
        layer = model.get_layer(name)
        assert layer.recipe.name == recipe and layer.get_config()["recipe"]["name"] == recipe
        assert layer.kernel.dtype == "float32" and layer.kernel.trainable
    metrics = scale_metrics(model)
    head_kernel = np.max(np.abs(model.get_layer("head").kernel.numpy()))
    assert metrics["fp8/head/kernel_scale"] == pytest.approx(head_kernel / 448, rel=0.05)  # per tensor
    assert metrics["fp8/head/outputs_grad_scale"] > 0 and "fp8/head/kernel_scale_median" not in metrics
    up = {key.rpartition("/outputs_grad_")[2]: value for key, value in metrics.items() if "fp8/up/outputs_grad_" in key}
    assert 0 < up["scale_min"] <= up["scale_median"] <= up["scale_max"] and up["at_bound"] == 0
    assert math.log2(up["scale_median"]).is_integer()  # power-of-2 block scales

    predictions = model.predict(x[:8], verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert {name: loaded.get_layer(name).recipe.name for name in LAYER_RECIPES} == LAYER_RECIPES
    np.testing.assert_array_equal(loaded.predict(x[:8], verbose=0), predictions)


def test_mxfp8_on_blackwell_feeds_scaled_matmul_the_same_operands_the_emulation_dequantizes(monkeypatch):
    """JAX lowers jax.nn.scaled_matmul for Blackwell only: here it is replaced by its documented
    definition, so what is checked is fp8exp's side: FP8 data and E8M0 scales laid out
    contraction-last and zero-padded to whole blocks (K = 80 and, for the weight gradient, M = 48
    are not multiples of 32), giving the emulation's result for the forward and both gradients."""
    from fp8exp.precision import gemm
    from fp8exp.precision.recipes import matmul
    from fp8exp.precision.recipes.matmul import quantized_matmul

    def documented(a, b, a_scales, b_scales, preferred_element_type=jnp.float32):
        calls.append((a.dtype, a_scales.dtype, a.shape[-1] // a_scales.shape[-1]))
        a = a.astype(jnp.float32) * jnp.repeat(a_scales.astype(jnp.float32), a.shape[-1] // a_scales.shape[-1], -1)
        b = b.astype(jnp.float32) * jnp.repeat(b_scales.astype(jnp.float32), b.shape[-1] // b_scales.shape[-1], -1)
        return jnp.einsum("BMK,BNK->BMN", a, b, precision=jax.lax.Precision.HIGHEST).astype(preferred_element_type)

    rng = np.random.default_rng(3)
    x, w, dy = (rng.normal(size=shape).astype(np.float32) for shape in ((48, 80), (80, 40), (48, 40)))
    x[5, 7] = 300.0  # an outlier: its block's scale differs from the rest
    recipe = make_recipe("mxfp8")

    def results():
        y, backward = jax.vjp(lambda a, b: quantized_matmul(a, b, recipe), x, w)
        return [np.asarray(v) for v in (y, *backward(dy))]

    emulated = results()
    calls = []
    monkeypatch.setattr(matmul, "block_scaled_gemms", lambda: True)
    monkeypatch.setattr(jax.nn, "scaled_matmul", documented)
    native = results()
    assert len(calls) == 3 and {c[1:] for c in calls} == {(np.dtype(jnp.float8_e8m0fnu), 32)}  # forward, dgrad, wgrad
    for got, want in zip(native, emulated):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    layer = RecipeDense(40, use_bias=False, recipe=recipe)
    layer.build((None, 80))
    assert gemm.dequantized_matmuls(keras.Sequential([keras.Input((80,)), layer])) == 0  # none emulated now
    monkeypatch.undo()
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (((1, 4, 64), jnp.float8_e4m3fn), ((1, 8, 64), jnp.float8_e4m3fn),
                                                      ((1, 4, 2), jnp.float8_e8m0fnu), ((1, 8, 2), jnp.float8_e8m0fnu))]
    assert gemm.count_matmuls(jax.make_jaxpr(jax.nn.scaled_matmul)(*shapes).jaxpr) == {"total": 1, "fp8": 1}
