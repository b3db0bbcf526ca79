"""Headroom on a fixed probe batch: how much of each quantized layer's input, kernel and output
gradient would saturate or flush to zero under the layer's current scale, and the
signal-to-noise ratio of the quantize-dequantize round trip (what Transformer Engine's debug
tools and torchao report). Recipe layers (precision/recipes/) scale from the tensor itself: for
them the numbers are what their own recipe makes of the tensor now (whatif.py's arithmetic)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import ml_dtypes
import numpy as np

from fp8exp.precision.readback import on_host
from fp8exp.precision.recipes.layers import is_recipe_layer
from fp8exp.precision.scales import fp8_layer_paths, scale_variables
from fp8exp.precision.whatif import STATS, TENSORS, WhatIf

FORMATS = {"inputs": ml_dtypes.float8_e4m3fn, "kernel": ml_dtypes.float8_e4m3fn,
           "outputs_grad": ml_dtypes.float8_e5m2}


def quantization_stats(x: np.ndarray, scale: float, fmt) -> dict[str, float]:
    """Keras' FP8 round trip (divide by the stored scale, clip to the format's max, cast,
    multiply back): shares that saturate or flush to zero, and the SQNR in dB."""
    x = np.asarray(x, np.float32).ravel()
    fp8_max = float(ml_dtypes.finfo(fmt).max)
    scaled = x / np.float32(scale)
    quantized = np.clip(scaled, -fp8_max, fp8_max).astype(fmt).astype(np.float32) * np.float32(scale)
    signal = float(np.sum(np.square(x, dtype=np.float64)))
    noise = float(np.sum(np.square(x - quantized, dtype=np.float64)))
    return {
        "saturation": float(np.mean(np.abs(scaled) > fp8_max)),
        "underflow": float(np.mean((x != 0) & (quantized == 0))),
        "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf,
    }


@dataclass
class Capture:
    inputs: np.ndarray
    output_shape: tuple[int, ...]


class Probe:
    """Runs the model on one fixed batch (inference mode: scales stay frozen) and records each
    quantized layer's input as the layer itself sees it and, given labels, the gradient of the
    loss at its output (what the layer's backward pass quantizes to E5M2). The pass is compiled
    once, with the variables as arguments, so a probe costs one forward and backward pass."""

    def __init__(self, model: keras.Model, batch: np.ndarray, labels: np.ndarray | None = None):
        self.model = model
        self.batch = batch
        self.labels = labels
        self.captures: dict[str, Capture] = {}
        self.output_grads: dict[str, np.ndarray] = {}
        self.sizes: dict[str, int] = {}
        """Elements per measured `<layer>/<tensor>`, so a share can be told from one element."""
        self._compiled = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._recipes: dict = {}  # recipe -> WhatIf measuring that recipe alone (compiled once)

    def _pass(self, taps, trainable, non_trainable, batch, labels):
        """Forward with every quantized layer's output shifted by its zero `tap`: the gradient
        with respect to a tap is the gradient at that layer's output."""
        paths = set(fp8_layer_paths(self.model))
        layers = [layer for layer in self.model._flatten_layers(include_self=False) if layer.path in paths]
        inputs: dict = {}
        for layer in layers:
            # Keras' float8 layers quantize in `quantized_call`, recipe layers in `call`.
            method = "call" if is_recipe_layer(layer) else "quantized_call"

            def capturing(x, *args, _layer=layer, _method=method, **kwargs):
                # Tap before the activation: the gradient is quantized at the matmul's output.
                activation, _layer.activation = _layer.activation, None
                try:
                    outputs = getattr(type(_layer), _method)(_layer, x, *args, **kwargs)
                finally:
                    _layer.activation = activation
                inputs[_layer.path] = x
                self._shapes[_layer.path] = tuple(outputs.shape)  # static while tracing
                if taps:
                    outputs = outputs + taps[_layer.path].astype(outputs.dtype)
                return activation(outputs) if activation is not None else outputs

            setattr(layer, method, capturing)  # an instance attribute shadows the method
        try:
            predictions, _ = self.model.stateless_call(trainable, non_trainable, batch, training=False)
        finally:
            for layer in layers:
                delattr(layer, "call" if is_recipe_layer(layer) else "quantized_call")
        loss = 0.0
        if labels is not None:  # the loss the model trains with (a language model's is on logits)
            loss_fn = keras.losses.get(self.model.loss) if getattr(self.model, "loss", None) else (
                keras.losses.BinaryCrossentropy() if predictions.shape[-1] == 1
                else keras.losses.SparseCategoricalCrossentropy())
            if predictions.shape[-1] == 1 and labels.ndim == predictions.ndim - 1:
                labels = labels[..., None]  # one sigmoid unit: as compile() lines them up
            loss = keras.ops.mean(loss_fn(labels, keras.ops.cast(predictions, "float32")))
        return loss, inputs

    def matmul_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape of every Dense and EinsumDense layer on the probe batch, quantized or not
        (one shape-only trace): what layer_table counts every matmul's FLOPs from."""
        import jax

        shapes: dict[str, tuple[int, ...]] = {}
        layers = [layer for layer in self.model._flatten_layers(include_self=False)
                  if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))]
        # Keras runs a quantized layer's `quantized_call` in place of `call`: hook whichever runs.
        hooked = [(layer, name) for layer in layers
                  for name in (("quantized_call",) if getattr(layer, "quantization_mode", None) else ("call",))]
        for layer, name in hooked:
            def recording(*args, _layer=layer, _call=getattr(layer, name), **kwargs):
                outputs = _call(*args, **kwargs)
                shapes[_layer.path] = tuple(outputs.shape)
                return outputs

            setattr(layer, name, recording)  # an instance attribute shadows the method
        try:
            variables = ([v.value for v in self.model.trainable_variables],
                         [v.value for v in self.model.non_trainable_variables])
            jax.eval_shape(lambda t, n, b: self.model.stateless_call(t, n, b, training=False)[0], *variables,
                           self.batch)
        finally:
            for layer, name in hooked:
                delattr(layer, name)
        return shapes

    def run(self) -> dict[str, Capture]:
        import jax

        variables = ([v.value for v in self.model.trainable_variables],
                     [v.value for v in self.model.non_trainable_variables])
        if self._compiled is None:
            jax.eval_shape(lambda *a: self._pass({}, *a), *variables, self.batch, self.labels)  # fills _shapes
            self._taps = {path: np.zeros(shape, np.float32) for path, shape in self._shapes.items()}
            gradients = jax.grad(self._pass, has_aux=True) if self.labels is not None else \
                (lambda taps, *a: (taps, self._pass(taps, *a)[1]))
            self._compiled = jax.jit(gradients, **self._replicated([*variables[0], *variables[1]]))
        grads, inputs = self._compiled(self._taps, *variables, self.batch, self.labels)
        self.captures = {path: Capture(np.asarray(x, np.float32), self._shapes[path]) for path, x in inputs.items()}
        self.output_grads = {path: np.asarray(g, np.float32) for path, g in grads.items()} \
            if self.labels is not None else {}
        return self.captures

    @staticmethod
    def _replicated(values) -> dict:
        """Weights on a mesh (a distribution; split, they stay split): the pass returns what it
        captured (each layer's input and output gradient on the probe batch) on every device, so
        every process reads it whole."""
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = next((v.sharding for v in values if isinstance(getattr(v, "sharding", None), NamedSharding)), None)
        return {"out_shardings": NamedSharding(sharding.mesh, PartitionSpec())} if sharding is not None else {}

    def metrics(self) -> dict[str, float]:
        """`fp8/<layer>/<tensor>_{saturation,underflow,sqnr_db}` for the current state: inputs,
        kernel and, with labels, outputs_grad."""
        captures = self.run()
        by_path = {layer.path: layer for layer in self.model._flatten_layers(include_self=False)}
        metrics = {}
        for entry in scale_variables(self.model):
            if entry.tensor == "inputs":
                values = captures[entry.layer].inputs
            elif entry.tensor == "kernel":
                values = on_host(by_path[entry.layer].kernel)  # one kernel at a time, gathered if split
            elif entry.layer in self.output_grads:
                values = self.output_grads[entry.layer]
            else:
                continue
            stats = quantization_stats(values, float(keras.ops.convert_to_numpy(entry.scale.value)),
                                       FORMATS[entry.tensor])
            self.sizes[f"{entry.layer}/{entry.tensor}"] = int(np.size(values))
            for name, value in stats.items():
                if math.isfinite(value):
                    metrics[f"fp8/{entry.layer}/{entry.tensor}_{name}"] = value
        metrics.update(self._recipe_metrics(by_path))
        return metrics

    def _recipe_metrics(self, by_path) -> dict[str, float]:
        """The same three numbers for recipe layers, under each layer's own recipe."""
        groups: dict = {}
        for path, capture in self.captures.items():
            if is_recipe_layer(by_path[path]):
                groups.setdefault(by_path[path].recipe, {})[path] = capture
        metrics = {}
        for recipe, captures in groups.items():
            if recipe not in self._recipes:
                self._recipes[recipe] = WhatIf(recipe, names=(recipe.name,), max_rows=None)  # every row
            measure = self._recipes[recipe]
            for layer, tensors in measure.table(self.model, captures, self.output_grads).items():
                sizes = {"inputs": np.size(captures[layer].inputs), "kernel": math.prod(by_path[layer].kernel.shape),
                         "outputs_grad": np.size(self.output_grads.get(layer, ()))}
                for tensor in (t for t in TENSORS if t in tensors):
                    self.sizes[f"{layer}/{tensor}"] = int(sizes[tensor])
                    metrics.update({f"fp8/{layer}/{tensor}_{name}": value
                                    for name, value in zip(STATS, tensors[tensor][0].tolist()) if math.isfinite(value)})
        return metrics
