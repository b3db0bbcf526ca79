"""Post-training quantization of a saved model, for comparison with FP8 training: Keras' INT8,
and FP8 with the scales Keras starts from (1.0) or with per-tensor scales calibrated on data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fp8exp.report.inference import AS_TRAINED, VARIANT_LABELS

FP8_MAX = {"inputs": 448.0, "kernel": 448.0}  # E4M3; output gradients play no part in inference


def calibrate_fp8(model, x: np.ndarray, batch_size: int = 128, passes: int = 2, to_inputs=None) -> None:
    """Per-tensor FP8 scales from data, in inference mode: each quantized layer's input amax over
    `x` (as fp8_health.Probe captures it) and its kernel's amax, each over E4M3's max. A second
    pass measures inputs again once the layers upstream quantize with their calibrated scales.
    `to_inputs`: padded ids -> what the model takes (a keras-hub family's dict)."""
    import keras

    from fp8exp.precision.probe import Probe
    from fp8exp.precision.scales import scale_variables

    entries = [entry for entry in scale_variables(model) if entry.tensor in FP8_MAX]
    layers = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
    batches = [x[start:start + batch_size] for start in range(0, len(x) - batch_size + 1, batch_size)] or [x]
    batches = [to_inputs(batch) for batch in batches] if to_inputs else batches
    probe = Probe(model, batches[0])
    for _ in range(passes):
        input_amax: dict[str, float] = {}
        for batch in batches:
            probe.batch = batch
            for path, capture in probe.run().items():
                input_amax[path] = max(input_amax.get(path, 0.0), float(np.max(np.abs(capture.inputs))))
        for entry in entries:
            if entry.tensor == "inputs":
                amax = input_amax[entry.layer]
            else:
                amax = float(np.max(np.abs(keras.ops.convert_to_numpy(layers[entry.layer].kernel))))
            if not math.isfinite(amax):
                raise ValueError(f"calibrating {entry.layer}: its {entry.tensor} are not finite")
            if amax > 0:
                entry.scale.assign(np.float32(amax / FP8_MAX[entry.tensor]))
                history = np.zeros(entry.amax_history.shape, np.float32)
                history[0] = amax
                entry.amax_history.assign(history)


def variant(directory: Path, name: str, calibration_x: np.ndarray | None = None):
    """A fresh copy of the saved model as `name` evaluates it (see VARIANT_LABELS)."""
    import warnings

    from fp8exp.serve.locate import load_directory

    if name not in VARIANT_LABELS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANT_LABELS)}")
    classifier = load_directory(directory, f"the model in {directory}")  # a classifier: infer_bench checked
    if name != AS_TRAINED:
        with warnings.catch_warnings():  # one "cannot be quantized" per norm, dropout, embedding...
            warnings.simplefilter("ignore")
            classifier.model.quantize("int8" if name == "int8_ptq" else "float8")
    if name == "fp8_ptq_calibrated":
        calibrate_fp8(classifier.model, calibration_x, to_inputs=classifier.model_inputs)
    return classifier
