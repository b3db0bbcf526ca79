"""Precision as a component applied to a built model: the global Keras dtype policy while
the model is built, then FP8 quantization of its Dense/EinsumDense layers (Keras' own delayed
scaling, or one of the recipes of precision/recipes/), and loss scaling for float16. Everything a
`precision=` choice changes happens here."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable, Iterator

import keras
from omegaconf import DictConfig

from fp8exp.config import ConfigError
from fp8exp.precision.recipes.layers import (
    Applied,
    apply_recipe,
    candidate_layers,
    high_precision_reason,
    is_recipe_layer,
    layer_dims,
)
from fp8exp.precision.recipes.recipe import Recipe, indivisible, make_recipe

log = logging.getLogger(__name__)

# Keras quantizes exactly these layer types (subclasses refuse); embeddings stay high precision.
QUANTIZABLE_TYPES = (keras.layers.Dense, keras.layers.EinsumDense)
DELAYED = "delayed"
"""Keras' own FP8: per-tensor delayed scaling from an amax history (the default recipe)."""
KERAS_AMAX_HISTORY = 1024
RECIPE_OPTIONS = ("margin", "power_of_2_scales", "block_size", "grad_format")


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


def recipe_name(precision: DictConfig) -> str | None:
    """The FP8 recipe of a float8 precision (`delayed` when unset); None for other precisions."""
    return (precision.get("recipe") or DELAYED) if precision.name == "float8" else None


def run_recipe(precision: DictConfig) -> Recipe | None:
    """The recipe with its options resolved (None: Keras' delayed scaling, or not float8)."""
    name = recipe_name(precision)
    if name in (None, DELAYED):
        return None
    return make_recipe(name, **{key: precision.get(key) for key in RECIPE_OPTIONS})


def build(precision: DictConfig, build_model: Callable[[], keras.Model]) -> keras.Model:
    with global_policy(build_policy(precision)):
        model = build_model()
    if precision.name == "float8":
        layers = select_layers(model, precision.get("skip"), precision.get("only"))
        recipe = run_recipe(precision)
        if recipe is None:
            quantize_float8(layers, precision.source_policy, precision.get("amax_history_length") or KERAS_AMAX_HISTORY)
        else:  # before compile: each recipe layer adds a variable the optimizer must know
            for line in recipe_notes(apply_recipe(layers, recipe)):
                log.warning(line)
    return model


def applied_recipe(model: keras.Model, precision: DictConfig) -> Applied | None:
    """What `build` did with a recipe, read back from the model: the layers that run it, those
    it pads and those it could not take (with why). None for delayed and non-float8 runs."""
    recipe = run_recipe(precision)
    if recipe is None:
        return None
    applied = Applied(recipe)
    for layer in candidate_layers(model):
        if is_recipe_layer(layer):
            applied.layers.append(layer.path)
            if problems := indivisible(layer.recipe, *layer_dims(layer)):
                applied.padded[layer.path] = problems
        elif reason := high_precision_reason(layer):
            applied.high_precision[layer.path] = reason
    return applied


def recipe_notes(applied: Applied) -> list[str]:
    """One line each for the layers padded and the layers left in high precision, naming them."""
    name, lines = applied.recipe.name, []
    if applied.padded:
        lines.append(f"FP8 recipe {name}: block_size {applied.recipe.block_size} does not divide these layers' "
                     "dims, so their operands are padded with zeros to whole blocks (exact; costs the padding): "
                     + "; ".join(f"{path} ({', '.join(why)})" for path, why in applied.padded.items()))
    if applied.high_precision:
        lines.append(f"FP8 recipe {name} cannot run in these layers; they stay in high precision: "
                     + "; ".join(f"{path} ({why})" for path, why in applied.high_precision.items()))
    return lines


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    # Model.quantize walks the same private list; there is no public recursive walk.
    return [layer for layer in model._flatten_layers(include_self=False) if not layer._layers]


def quantizable_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Dense/EinsumDense leaves (exact types, as Keras quantizes them) and recipe layers."""
    return [layer for layer in leaf_layers(model) if type(layer) in QUANTIZABLE_TYPES or is_recipe_layer(layer)]


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
