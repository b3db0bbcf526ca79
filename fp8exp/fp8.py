"""FP8 scaling state: find a model's scale and amax-history variables by their real paths and
turn them into metrics, without disturbing the training it observes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

from fp8exp.train import StepCallback

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
    """`fp8/<layer>/<tensor>_scale` and `..._amax` (the max over the amax history window)."""
    metrics = {}
    for entry in entries:
        scale = float(keras.ops.convert_to_numpy(entry.scale.value))
        amax = float(np.max(keras.ops.convert_to_numpy(entry.amax_history.value)))
        metrics[f"fp8/{entry.layer}/{entry.tensor}_scale"] = scale
        metrics[f"fp8/{entry.layer}/{entry.tensor}_amax"] = amax
    return metrics


class Fp8StateLogger(StepCallback):
    """Sends FP8 state to `sink(metrics, step)` every `every` optimizer steps and at the end.

    On JAX, `self.model` copies the training state back into the Keras variables, so it is
    touched only at log points, which are listed in `logged_steps` for the step timer to skip.
    """

    def __init__(self, every: int, sink: Callable[[dict[str, float], int], None], probe=None):
        super().__init__()
        self.every = every
        self.sink = sink
        self.probe = probe
        """Optional object whose `metrics()` adds probe-batch diagnostics at each log point."""
        self.probe_metrics: dict[str, float] = {}
        self.probe_seconds = 0.0
        self.logged_steps: list[int] = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        last = self.logged_steps[-1] if self.logged_steps else 0
        if self.step // self.every > last // self.every:
            self._log()

    def on_train_end(self, logs=None):
        if not self.logged_steps or self.logged_steps[-1] != self.step:
            self._log()

    def _log(self):
        metrics = state_metrics(scale_variables(self.model))
        if self.probe is not None:
            started = time.perf_counter()
            self.probe_metrics = self.probe.metrics()
            self.probe_seconds += time.perf_counter() - started
            metrics.update(self.probe_metrics)
        self.sink(metrics, self.step)
        self.logged_steps.append(self.step)
