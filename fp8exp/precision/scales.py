"""FP8 scaling state: find a model's scale and amax-history variables by their real paths and
turn them into metrics."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

# Each quantized layer carries a scale and an amax history for these three tensors.
SCALED_TENSORS = ("inputs", "kernel", "outputs_grad")


@dataclass(frozen=True)
class ScaleVariables:
    layer: str
    tensor: str
    scale: keras.Variable
    amax_history: keras.Variable


def scale_variables(model: keras.Model) -> list[ScaleVariables]:
    """One entry per (quantized layer, scaled tensor), in model order."""
    by_path = {variable.path: variable for variable in model.variables}
    found = []
    for path, variable in by_path.items():
        layer, _, name = path.rpartition("/")
        for tensor in SCALED_TENSORS:
            if name == f"{tensor}_scale":
                found.append(ScaleVariables(layer, tensor, variable, by_path[f"{layer}/{tensor}_amax_history"]))
    return found


def state_size(model: keras.Model) -> int:
    """Elements of FP8 bookkeeping (scales, amax histories) that `count_params` includes."""
    return sum(int(np.prod(e.scale.shape)) + int(np.prod(e.amax_history.shape)) for e in scale_variables(model))


def state_metrics(entries: list[ScaleVariables]) -> dict[str, float]:
    """`fp8/<layer>/<tensor>_scale` and `..._amax` (the max over the amax history window) as the
    variables hold them after a step. Keras' delayed scaling computes a step's new scale from the
    history *before* adding that step's amax, and quantizes with the scale stored at the step
    before: after step N the scale variable holds the scale step N+1 quantizes with, computed from
    the amaxes of steps up to N-1, while the history already holds step N's amax."""
    metrics = {}
    for entry in entries:
        scale = float(keras.ops.convert_to_numpy(entry.scale.value))
        amax = float(np.max(keras.ops.convert_to_numpy(entry.amax_history.value)))
        metrics[f"fp8/{entry.layer}/{entry.tensor}_scale"] = scale
        metrics[f"fp8/{entry.layer}/{entry.tensor}_amax"] = amax
    return metrics
