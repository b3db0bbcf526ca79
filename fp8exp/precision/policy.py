"""Precision as a component applied to a built model: the global Keras dtype policy while
the model is built, then FP8 quantization of its Dense/EinsumDense layers, and loss scaling
for float16. Everything a `precision=` choice changes happens here."""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator

import keras
from omegaconf import DictConfig

from fp8exp.config import ConfigError

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
        layers = select_layers(model, precision.get("skip"), precision.get("only"))
        quantize_float8(layers, precision.source_policy, precision.amax_history_length)
    return model


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    # Model.quantize walks the same private list; there is no public recursive walk.
    return [layer for layer in model._flatten_layers(include_self=False) if not layer._layers]


def quantizable_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in leaf_layers(model) if type(layer) in QUANTIZABLE_TYPES]


def select_layers(model: keras.Model, skip: str | None, only: str | None) -> list[keras.layers.Layer]:
    """The Dense/EinsumDense layers to quantize: all, or those `only` matches, minus those
    `skip` matches. A pattern that matches no quantizable layer (nothing, or only layers Keras
    cannot quantize such as embeddings and norms) is an error listing what it could match."""
    candidates = quantizable_layers(model)
    selected = candidates
    for key, pattern in (("only", only), ("skip", skip)):
        if pattern is None:
            continue
        matching = [layer for layer in candidates if re.search(pattern, layer.path)]
        others = [layer.path for layer in leaf_layers(model)
                  if layer.weights and layer not in candidates and re.search(pattern, layer.path)]
        if not matching:
            found = f"only layers Keras cannot quantize ({', '.join(others)})" if others else "no layer"
            raise ConfigError(f"precision.{key}", f"{pattern!r} matches {found}; quantizable layers: "
                              f"{', '.join(layer.path for layer in candidates)}")
        selected = [layer for layer in selected if (layer in matching) == (key == "only")]
    if not selected:
        raise ConfigError("precision.skip", "skips every quantizable layer; use a non-FP8 precision instead")
    return selected


def quantize_float8(layers: list[keras.layers.Layer], source_policy: str, amax_history_length: int) -> None:
    """Assigning a QuantizedFloat8DTypePolicy to a built layer quantizes it with that policy's
    amax history length, which `model.quantize("float8")` would pin to 1024. (Keras' own
    `quantize(filters=...)` selects layers by name only, and with the fixed history.)"""
    policy = keras.dtype_policies.QuantizedFloat8DTypePolicy(
        "float8", source_policy, amax_history_length=amax_history_length)
    for layer in layers:
        layer.dtype_policy = policy


def optimizer(precision: DictConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam, with dynamic loss scaling wherever float16 computes gradients."""
    adam = keras.optimizers.Adam(learning_rate=learning_rate)
    if build_policy(precision) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(adam)
    return adam
