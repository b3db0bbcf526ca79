"""What-if numerics: at each FP8 log point, what every FP8 recipe would make of each quantized
layer's tensors right now, whichever recipe the run trains with (Transformer Engine's debug tool
offers this per recipe, for PyTorch only).

The tensors are the matmul operands the recipes' scale records describe (recipes/matmul.py): the
layer's input X [M, K] and kernel W [K, N] as the forward matmul contracts them (along K), and the
output gradient dY [M, N] as the input-gradient matmul does (along N); EinsumDense operands are
reduced to those 2-D views as the recipes reduce them. What each recipe does to them:

    delayed   per tensor, E4M3 (gradient E5M2), in Keras' arithmetic (x / scale, clip, cast): with
              the layer's current Keras scale on a delayed run, with the current amax's otherwise
    current, rowwise, rowwise_gw_hp, block, mxfp8
              the forward X and W and dgrad dY operand specs of recipes/plan.py, with the recipe's
              defaults (the run's own recipe with the run's options); rowwise and rowwise_gw_hp
              differ only in the weight-gradient side, so their rows here are equal
    nvfp4     recipes/nvfp4.py: E2M1 data, an E4M3 scale per 16 elements, one FP32 scale per tensor

Per (layer, tensor, recipe): `saturation`, the share of elements whose scaled magnitude exceeds the
format's largest value (|x| / decode scale > max, beyond float32 rounding: they clip); `underflow`, the share of non-zero
elements that become zero; `sqnr_db`, 10 log10(sum x^2 / sum (x - q(x))^2) (inf: no error), on at
most MAX_ROWS token rows of each activation and gradient (`sample_rows`; kernels whole). All of
it is one jitted function over the captured tensors (same-shaped operands stacked, so it grows
with the model's distinct shapes, not its depth), compiled once per run at the first point (the
probe batch's shapes do not change); a point after that costs about what the probe's pass does.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np

from fp8exp.precision.readback import on_host
from fp8exp.precision.recipes import formats
from fp8exp.precision.recipes.matmul import RECORD_TENSORS, einsum_layout
from fp8exp.precision.recipes.nvfp4 import BLOCK, dequantize_nvfp4, quantize_nvfp4
from fp8exp.precision.recipes.plan import plan
from fp8exp.precision.recipes.quantize import OperandSpec, expand_scale, fake_quantize_with_amax
from fp8exp.precision.recipes.recipe import TRAINABLE, Recipe, make_recipe
from fp8exp.precision.scales import scale_variables

RECIPES = ("delayed", *TRAINABLE, "nvfp4")
TENSORS = RECORD_TENSORS
AXES = {"inputs": 1, "kernel": 0, "outputs_grad": 1}
"""The axis each 2-D operand is contracted along (X [M, K], W [K, N], dY [M, N])."""
KERAS_FORMATS = {"inputs": "e4m3", "kernel": "e4m3", "outputs_grad": "e5m2"}
STATS = ("saturation", "underflow", "sqnr_db")
MAX_ROWS = 1024
"""Token rows of each activation and output gradient measured (see sample_rows): bounds the cost
of a point, which grows with rows x recipes, near the probe's own pass."""
COLUMNS = ("layer", "tensor", "recipe", *STATS)


def recipe_views(run_recipe: Recipe | None, names=RECIPES) -> dict[str, dict[str, OperandSpec | str]]:
    """Per recipe, what each tensor gets: an OperandSpec, a format name (delayed: Keras per tensor)
    or "nvfp4". `run_recipe` (None: a delayed run) brings the run's options to its own recipe."""
    views = {}
    for name in names:
        if name == "delayed":
            views[name] = dict(KERAS_FORMATS)
        elif name == "nvfp4":
            views[name] = {tensor: "nvfp4" for tensor in TENSORS}
        else:
            specs = plan(run_recipe if run_recipe is not None and run_recipe.name == name else make_recipe(name))
            views[name] = {"inputs": specs.fwd_x, "kernel": specs.fwd_w, "outputs_grad": specs.dgrad_dy}
    return views


def layer_operands(layer, inputs: np.ndarray, kernel: np.ndarray, outputs_grad: np.ndarray | None = None):
    """{tensor: 2-D float32 operand} of a Dense (x [..., K] @ kernel [K, N]) or EinsumDense layer
    (recipes.matmul.UnsupportedEquation if its equation is no plain matmul)."""
    inputs, kernel = np.asarray(inputs, np.float32), np.asarray(kernel, np.float32)
    if isinstance(layer, keras.layers.EinsumDense):
        lay = einsum_layout(layer.equation)
        size = {**dict(zip(lay.inputs, inputs.shape)), **dict(zip(lay.kernel, kernel.shape))}
        k = math.prod(size[c] for c in lay.k)
        x = np.transpose(inputs, [lay.inputs.index(c) for c in lay.m + lay.k]).reshape(-1, k)
        w = np.transpose(kernel, [lay.kernel.index(c) for c in lay.k + lay.n]).reshape(k, -1)
        to_2d = (lambda g: np.transpose(g, [lay.output.index(c) for c in lay.m + lay.n]).reshape(x.shape[0], -1))
    else:
        x, w = inputs.reshape(-1, kernel.shape[0]), kernel
        to_2d = (lambda g: g.reshape(-1, kernel.shape[-1]))
    operands = {"inputs": x, "kernel": w}
    if outputs_grad is not None:
        operands["outputs_grad"] = to_2d(np.asarray(outputs_grad, np.float32))
    return operands


SATURATION_SLACK = 1 + 2.0 ** -20
"""A scale computed from the tensor's own amax may put its largest element a float32 rounding
above the format's max: that element is not counted as saturated."""


def _sums(x, q, decode, fmax: float):
    """[saturated count, underflow count, sum x^2, sum (x - q)^2]: padding zeros add nothing."""
    scaled = jnp.abs(x) / jnp.where(decode > 0, decode, jnp.inf) / SATURATION_SLACK
    return jnp.stack([jnp.sum(scaled > fmax, dtype=jnp.float32), jnp.sum((x != 0) & (q == 0), dtype=jnp.float32),
                      jnp.sum(jnp.square(x)), jnp.sum(jnp.square(x - q))])


def finish(sums: np.ndarray, size: int) -> np.ndarray:
    """[..., 4] sums of `_sums` over `size` real elements -> [..., 3] saturation, underflow, sqnr_db."""
    sums = np.asarray(sums, np.float64)
    signal, noise = sums[..., 2], sums[..., 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        sqnr = np.where(noise > 0, 10 * np.log10(signal / np.where(noise > 0, noise, 1.0)),
                        np.where(signal > 0, np.inf, np.nan))
    return np.stack([sums[..., 0] / size, sums[..., 1] / size, sqnr], axis=-1)


def _stats(x, view, axis: int, scale=None):
    """`_sums` of what `view` makes of the 2-D float32 operand x."""
    if view == "nvfp4":
        data, block_scale, tensor_scale = quantize_nvfp4(x, axis)
        spec = OperandSpec("tile", "e4m3", BLOCK)
        decode = expand_scale(block_scale.astype(jnp.float32), spec, axis, x.shape) / tensor_scale
        return _sums(x, dequantize_nvfp4(data, block_scale, tensor_scale, axis), decode, formats.MAX["e2m1"])
    if isinstance(view, str):  # Keras' per-tensor arithmetic, with a given scale or this tensor's amax
        fmax = formats.MAX[view]
        if scale is None:
            amax = jnp.max(jnp.abs(x))
            scale = jnp.where(amax > 0, amax / fmax, 1.0)
        scale = jnp.asarray(scale, jnp.float32)
        q = formats.saturate_cast(x / scale, view).astype(jnp.float32) * scale
        return _sums(x, q, scale, fmax)
    q, scale, _ = fake_quantize_with_amax(x, view, axis)
    return _sums(x, q, expand_scale(scale, view, axis, x.shape), formats.MAX[view.fmt])


def _table(groups, views):
    """{group: float32[members, len(views), 4]} (`_sums`). A group stacks the operands of one tensor
    kind and contraction length, zero-padded at the end of their other axis to the longest (zeros
    at the end of an axis are what the quantizers pad blocks with anyway: no scale changes), with
    their delayed scales or None; so the program grows with the model's distinct widths, not its depth."""
    out = {}
    for key, (stacked, scales) in groups.items():
        tensor = key.partition(":")[0]
        done: dict = {}  # recipes that treat this tensor alike (rowwise, rowwise_gw_hp) share one pass
        for name, view in views.items():
            delayed = name == "delayed" and scales is not None
            if (view[tensor], delayed) not in done:
                def one(x, scale=None, _view=view[tensor], _axis=AXES[tensor]):
                    return _stats(x.astype(jnp.float32), _view, _axis, scale)
                done[view[tensor], delayed] = jax.vmap(one)(stacked, scales) if delayed else jax.vmap(one)(stacked)
        out[key] = jnp.stack([done[view[tensor], name == "delayed" and scales is not None]
                              for name, view in views.items()], axis=1)
    return out


def sample_rows(x: np.ndarray, limit: int | None) -> np.ndarray:
    """At most `limit` rows (tokens) of an activation or gradient [M, C]: evenly spaced, plus the
    row holding the largest magnitude, so that per-tensor scales (current, nvfp4's tensor scale)
    are the whole tensor's. Every recipe scales a row of these on its own."""
    if limit is None or x.shape[0] <= limit:
        return x
    rows = np.linspace(0, x.shape[0] - 1, limit - 1).astype(np.int64)
    peak = np.unravel_index(np.argmax(np.abs(x)), x.shape)[0]
    return x[np.union1d(rows, [peak])]


def _stack(operands: list[np.ndarray], axis: int) -> np.ndarray:
    """Operands sharing their contraction length, zero-padded along the other axis and stacked."""
    other = 1 - axis
    longest = max(x.shape[other] for x in operands)
    widths = [[(0, 0), (0, 0)] for _ in operands]
    for width, x in zip(widths, operands):
        width[other] = (0, longest - x.shape[other])
    return np.stack([np.pad(x, width) for x, width in zip(operands, widths)])


class WhatIf:
    """Measures every recipe at a probe's captures (call `measure` after `Probe.metrics()`), keeps
    the last point for the summary and the heat map, and the seconds it took (`seconds`)."""

    def __init__(self, run_recipe: Recipe | None, names=RECIPES, max_rows: int | None = MAX_ROWS):
        self.run_recipe = run_recipe
        self.max_rows = max_rows
        self.views = recipe_views(run_recipe, names)
        self._compiled = jax.jit(functools.partial(_table, views=self.views))
        self.last: tuple[int, list[tuple]] | None = None
        self.seconds = 0.0
        self.skipped: dict[str, str] = {}
        """Layers left out, with why (an einsum that is no plain matmul)."""

    def operands(self, model: keras.Model, captures, output_grads) -> dict:
        by_path = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
        operands = {}
        for path, capture in captures.items():
            layer = by_path[path]
            try:
                operands[path] = layer_operands(layer, capture.inputs, on_host(layer.kernel),
                                                output_grads.get(path))
            except ValueError as error:
                self.skipped[path] = str(error)
        return operands

    def table(self, model: keras.Model, captures, output_grads) -> dict[str, dict[str, np.ndarray]]:
        """{layer: {tensor: float64[recipes, 3]}}, in the order of `self.views`."""
        scales = {}
        if self.run_recipe is None and "delayed" in self.views:  # the Keras scales this run quantizes with
            scales = {(entry.layer, entry.tensor): np.float32(keras.ops.convert_to_numpy(entry.scale.value))
                      for entry in scale_variables(model)}
        operands = self.operands(model, captures, output_grads)
        members: dict[str, list[tuple[str, np.ndarray]]] = {}
        for layer, tensors in operands.items():
            for tensor, x in tensors.items():
                x = sample_rows(x, self.max_rows) if AXES[tensor] == 1 else x  # kernels: whole
                members.setdefault(f"{tensor}:{x.shape[AXES[tensor]]}", []).append((layer, x))
        groups = {key: (_stack([x for _, x in group], AXES[key.partition(":")[0]]),
                        np.array([scales[layer, key.partition(":")[0]] for layer, _ in group]) if scales else None)
                  for key, group in members.items()}
        result = jax.device_get(self._compiled(groups))
        table: dict[str, dict[str, np.ndarray]] = {layer: {} for layer in operands}  # in the captures' order
        for key, group in members.items():
            for index, (layer, x) in enumerate(group):
                table[layer][key.partition(":")[0]] = finish(result[key][index], x.size)
        return table

    def measure(self, model: keras.Model, probe, step: int) -> list[tuple]:
        """Rows (layer, tensor, recipe, saturation, underflow, sqnr_db) at `step`, from the probe's
        latest captures and output gradients."""
        started = time.perf_counter()
        table = self.table(model, probe.captures, probe.output_grads)
        rows = [(layer, tensor, recipe, *tensors[tensor][index].tolist())
                for layer, tensors in table.items() for tensor in TENSORS if tensor in tensors
                for index, recipe in enumerate(self.views)]
        self.last = (step, rows)
        self.seconds += time.perf_counter() - started
        return rows


def to_csv(rows: list[tuple], step: int | None = None) -> str:
    """The rows as CSV (COLUMNS; with `step`, a last column naming the point)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, *(["step"] if step is not None else [])])
    for layer, tensor, recipe, *values in rows:
        writer.writerow([layer, tensor, recipe, *(f"{value:.6g}" for value in values),
                         *([step] if step is not None else [])])
    return out.getvalue()


def plot_sqnr(rows: list[tuple], path: Path, step: int) -> None:
    """Heat map (PNG): layers x recipes coloured by SQNR, one panel per tensor (headless matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(row[0] for row in rows))
    recipes = list(dict.fromkeys(row[2] for row in rows))
    tensors = [tensor for tensor in TENSORS if any(row[1] == tensor for row in rows)]
    finite = [row[5] for row in rows if math.isfinite(row[5])] or [0.0]
    low, high = min(finite), max(finite)
    fig, axes = plt.subplots(1, len(tensors), squeeze=False, sharey=True, constrained_layout=True,
                             figsize=(1.9 + 0.62 * len(recipes) * len(tensors), 1.6 + 0.34 * len(layers)))
    for ax, tensor in zip(axes[0], tensors):
        grid = np.full((len(layers), len(recipes)), np.nan)
        for layer, row_tensor, recipe, _, _, sqnr in rows:
            if row_tensor == tensor:
                grid[layers.index(layer), recipes.index(recipe)] = sqnr
        image = ax.imshow(np.clip(grid, low, high), cmap="viridis", vmin=low, vmax=high, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, "inf" if math.isinf(value) else f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < (low + high) / 2 else "black")
        ax.set_title(tensor, fontsize=9)
        ax.set_xticks(range(len(recipes)), recipes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="SQNR (dB), higher is better")
    fig.suptitle(f"What-if FP8 recipes at step {step}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
