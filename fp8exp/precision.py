"""Precision as a component applied to a built model: the global Keras dtype policy while
the model is built, then FP8 quantization of its Dense/EinsumDense layers, and loss scaling
for float16. Everything a `precision=` choice changes happens here."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import keras
from omegaconf import DictConfig

# Keras quantizes exactly these layer types (subclasses refuse); embeddings stay high precision.
QUANTIZABLE_TYPES = (keras.layers.Dense, keras.layers.EinsumDense)


@contextlib.contextmanager
def global_policy(name: str) -> Iterator[None]:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_policy(precision: DictConfig) -> str:
    """The policy layers are built under: FP8 starts from its source policy."""
    return precision.source_policy if precision.name == "float8" else precision.name


def build(precision: DictConfig, build_model: Callable[[], keras.Model]) -> keras.Model:
    with global_policy(build_policy(precision)):
        model = build_model()
    if precision.name == "float8":
        quantize_float8(model, precision.source_policy, precision.amax_history_length)
    return model


def quantizable_layers(model: keras.Model) -> list[keras.layers.Layer]:
    # Model.quantize walks the same private list; there is no public recursive walk.
    return [layer for layer in model._flatten_layers(include_self=False)
            if type(layer) in QUANTIZABLE_TYPES]


def quantize_float8(model: keras.Model, source_policy: str, amax_history_length: int) -> list[str]:
    """Quantize every Dense/EinsumDense layer; returns their paths.

    Assigning a QuantizedFloat8DTypePolicy to a built layer quantizes it with that policy's
    amax history length, which `model.quantize("float8")` would pin to 1024.
    """
    policy = keras.dtype_policies.QuantizedFloat8DTypePolicy(
        "float8", source_policy, amax_history_length=amax_history_length)
    layers = quantizable_layers(model)
    for layer in layers:
        layer.dtype_policy = policy
    return [layer.path for layer in layers]


def optimizer(precision: DictConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam, with dynamic loss scaling wherever float16 computes gradients."""
    adam = keras.optimizers.Adam(learning_rate=learning_rate)
    if build_policy(precision) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(adam)
    return adam
