"""FP8 scaling state: find a model's scale and amax-history variables (Keras' delayed scaling) by
their real paths, read the recipe layers' scale records (precision/recipes/), and turn both into
metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np

from fp8exp.precision.recipes.layers import RECORD, recipe_layers, scale_metrics
from fp8exp.precision.recipes.matmul import RECORD_TENSORS
from fp8exp.precision.recipes.stats import COLUMNS

# Each quantized layer carries a scale and an amax history for these three tensors (recipe layers
# record the same three: recipes.matmul.RECORD_TENSORS).
SCALED_TENSORS = RECORD_TENSORS


@dataclass(frozen=True)
class ScaleVariables:
    layer: str
    tensor: str
    scale: keras.Variable
    amax_history: keras.Variable


def scale_variables(model: keras.Model) -> list[ScaleVariables]:
    """One entry per (Keras-quantized layer, scaled tensor), in model order. Recipe layers have
    no such pair: see `recipe_records`."""
    by_path = {variable.path: variable for variable in model.variables}
    found = []
    for path, variable in by_path.items():
        layer, _, name = path.rpartition("/")
        for tensor in SCALED_TENSORS:
            if name == f"{tensor}_scale" and f"{layer}/{tensor}_amax_history" in by_path:
                found.append(ScaleVariables(layer, tensor, variable, by_path[f"{layer}/{tensor}_amax_history"]))
    return found


def fp8_layer_paths(model: keras.Model) -> list[str]:
    """Paths of the layers that run FP8: Keras-quantized ones and recipe layers, in model order."""
    keras_layers = {entry.layer for entry in scale_variables(model)}
    recipes = {layer.path for layer in recipe_layers(model)}
    return [layer.path for layer in model._flatten_layers(include_self=False)
            if layer.path in keras_layers or layer.path in recipes]


def recipe_records(model: keras.Model) -> dict[str, dict[str, dict[str, float]]]:
    """Layer path -> tensor -> stats.COLUMNS -> value: each recipe layer's record of its last
    training step (all zeros before the first). Reading it syncs the variable to the host."""
    records = {}
    for layer in recipe_layers(model):
        if layer.track_scales:
            rows = np.asarray(keras.ops.convert_to_numpy(layer.scale_stats.value), np.float64)
            records[layer.path] = {tensor: dict(zip(COLUMNS, row.tolist())) for tensor, row in zip(RECORD_TENSORS, rows)}
    return records


def is_fp8_state(variable) -> bool:
    """A scale, amax history (Keras) or scale record (recipes): bookkeeping every device must hold
    whole, so that all quantize alike and any process can read it."""
    return variable.name == RECORD or variable.name.endswith(("_scale", "_amax_history"))


def state_size(model: keras.Model) -> int:
    """Elements of FP8 bookkeeping (scales, amax histories, recipe records) that `count_params` includes."""
    keras_state = sum(int(np.prod(e.scale.shape)) + int(np.prod(e.amax_history.shape)) for e in scale_variables(model))
    return keras_state + sum(int(np.prod(layer.scale_stats.shape)) for layer in recipe_layers(model) if layer.track_scales)


def state_metrics(source: keras.Model | list[ScaleVariables]) -> dict[str, float]:
    """`fp8/<layer>/<tensor>_scale` and `..._amax` (the max over the amax history window) as the
    variables hold them after a step. Keras' delayed scaling computes a step's new scale from the
    history *before* adding that step's amax, and quantizes with the scale stored at the step
    before: after step N the scale variable holds the scale step N+1 quantizes with, computed from
    the amaxes of steps up to N-1, while the history already holds step N's amax.

    Given the model, recipe layers too (recipes.layers.scale_metrics: the scales step N used):
    per-tensor recipes `_scale` and `_amax`, block recipes `_{scale_min,scale_max,scale_median,
    at_bound,zero_blocks,amax}`."""
    if isinstance(source, keras.Model):
        return {**state_metrics(scale_variables(source)), **scale_metrics(source)}
    metrics = {}
    for entry in source:
        scale = float(keras.ops.convert_to_numpy(entry.scale.value))
        amax = float(np.max(keras.ops.convert_to_numpy(entry.amax_history.value)))
        metrics[f"fp8/{entry.layer}/{entry.tensor}_scale"] = scale
        metrics[f"fp8/{entry.layer}/{entry.tensor}_amax"] = amax
    return metrics


def non_finite_state(model: keras.Model) -> list[str]:
    """`<layer>/<tensor>_scale` or `_amax_history` variables (Keras) and `<layer>/<tensor>_scale_stats`
    records (recipes) holding a NaN or Inf."""
    bad = []
    for entry in scale_variables(model):
        for name, variable in (("scale", entry.scale), ("amax_history", entry.amax_history)):
            if not np.all(np.isfinite(keras.ops.convert_to_numpy(variable.value))):
                bad.append(f"{entry.layer}/{entry.tensor}_{name}")
    for layer, tensors in recipe_records(model).items():
        bad += [f"{layer}/{tensor}_scale_stats" for tensor, stats in tensors.items()
                if not all(math.isfinite(value) for value in stats.values())]
    return bad
