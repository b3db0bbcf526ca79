"""Recipes on a built Keras model: its Dense and EinsumDense layers (exactly those types, the
ones Keras' float8 quantizes) become RecipeDense / RecipeEinsumDense, whose call runs the
quantized matmul of matmul.py.

Why a class swap rather than a dtype policy: a policy with a quantization mode sends Keras to
its own `_float8_call` (delayed scaling), and one without changes nothing in `Dense.call`. The
swap keeps the layer object, its name, path and variables; the kernel stays a normal float
variable. The classes are registered Keras serializables ("fp8exp>RecipeDense",
"fp8exp>RecipeEinsumDense": saved models name them) whose config adds every recipe option, so
`model.save` / `keras.saving.load_model` restore them (with this module imported) wherever the
model's own config builds the layer: a functional model's layers. A layer that a subclassed layer
builds itself (keras-hub blocks, MultiHeadAttention) comes back as plain Dense holding the same
weights: `adopt` makes it a recipe layer again (serve/textmodel does, from the saved metadata).
Keras names a functional model's weight groups after the layer classes (`layers/recipe_dense`),
so its weights file loads into recipe layers, not plain ones.

Each recipe layer also carries `scale_stats`, float32 (3, 6): rows matmul.RECORD_TENSORS
(forward X and W, dgrad dY), columns stats.COLUMNS, overwritten with this step's values through
its gradient (`overwrite_with_gradient`, as Keras' float8 scales; the numerics never read it).
It is a model variable (checkpoints hold it) but `save_own_variables` writes kernel and bias only,
as Dense does, so the nested case above loads, and a loaded layer's record starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
from keras import ops

from .matmul import RECORD_SHAPE, RECORD_TENSORS, UnsupportedEquation, einsum_dims, quantized_einsum, quantized_matmul
from .recipe import TRAINABLE, Recipe, indivisible
from .stats import COLUMNS

RECORD = "scale_stats"
PER_TENSOR = ("current",)
"""Recipes whose scales are one number per tensor: logged as `<tensor>_scale`, `<tensor>_amax`."""


class _RecipeLayer:
    """What RecipeDense and RecipeEinsumDense share: the recipe, its config, the record, and a
    call that runs the subclass's `_product(inputs, kernel, record)` then bias and activation."""

    def build(self, input_shape):
        super().build(input_shape)
        self._add_record()

    def call(self, inputs, training=None):
        if self.lora_enabled:
            raise NotImplementedError("FP8 recipes do not support LoRA")
        return self._finish(self._product(inputs, ops.convert_to_tensor(self.kernel), self._record()))

    def get_config(self):
        return {**super().get_config(), **self.recipe_config()}

    @classmethod
    def adopt(cls, layer, recipe, track_scales: bool = True):
        """Make `layer`, a built Dense (for RecipeDense) or EinsumDense (RecipeEinsumDense) of exactly
        that type, this recipe layer in place: apply_recipe's swap, and how a loader restores the
        recipe layers that a reloaded keras-hub block rebuilt as plain ones. Returns the layer."""
        base = BASES[cls]
        if type(layer) not in (base, cls):
            raise TypeError(f"{layer.path or layer.name}: {type(layer).__name__} cannot become {cls.__name__}, "
                            f"only {base.__name__} can")
        layer.__class__ = cls
        layer._init_recipe(recipe, track_scales)
        layer._add_record()
        return layer

    def _init_recipe(self, recipe, track_scales: bool) -> None:
        if recipe is None:
            raise ValueError(f"{type(self).__name__} needs a recipe")
        if not isinstance(recipe, Recipe):
            try:
                recipe = Recipe.from_config(dict(recipe))
            except TypeError as error:  # a config from elsewhere: unknown or missing options
                raise ValueError(f"{type(self).__name__}: {recipe!r} is not a recipe config ({error})") from None
        if recipe.name not in TRAINABLE:
            raise ValueError(f"recipe {recipe.name!r} is for what-if numerics only; trainable: {', '.join(TRAINABLE)}")
        self.recipe = recipe
        self.track_scales = bool(track_scales)

    def _add_record(self) -> None:
        if not self.track_scales or getattr(self, RECORD, None) is not None:
            return
        self._tracker.unlock()
        self.scale_stats = self.add_weight(name=RECORD, shape=RECORD_SHAPE, initializer="zeros", trainable=True,
                                           autocast=False, overwrite_with_gradient=True)
        self._tracker.lock()

    def _record(self):
        return ops.convert_to_tensor(self.scale_stats) if self.track_scales else None

    def recipe_config(self) -> dict:
        """What the layer adds to its base's config: the recipe with every option, and track_scales."""
        return {"recipe": self.recipe.get_config(), "track_scales": self.track_scales}

    def _check_load_own_variables(self, store):
        # Saved weights hold kernel (and bias) only: the record is not model state.
        variables = self._trainable_variables + self._non_trainable_variables
        if getattr(self, RECORD, None) is not None and len(store.keys()) == len(variables) - 1:
            return
        super()._check_load_own_variables(store)

    def _finish(self, x):
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x


@keras.saving.register_keras_serializable(package="fp8exp")
class RecipeDense(_RecipeLayer, keras.layers.Dense):
    """Dense whose matmul runs an FP8 recipe (x [..., K] @ kernel [K, N])."""

    def __init__(self, units, recipe=None, track_scales=True, **kwargs):
        super().__init__(units, **kwargs)
        self._init_recipe(recipe, track_scales)

    def _product(self, inputs, kernel, record):
        return quantized_matmul(inputs, kernel, self.recipe, record)


@keras.saving.register_keras_serializable(package="fp8exp")
class RecipeEinsumDense(_RecipeLayer, keras.layers.EinsumDense):
    """EinsumDense whose einsum runs an FP8 recipe (equations: see matmul.einsum_layout)."""

    def __init__(self, equation, output_shape, recipe=None, track_scales=True, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self._init_recipe(recipe, track_scales)

    def _product(self, inputs, kernel, record):
        return quantized_einsum(self.equation, inputs, kernel, self.recipe, record)


SWAPS = {keras.layers.Dense: RecipeDense, keras.layers.EinsumDense: RecipeEinsumDense}
BASES = {recipe_class: base for base, recipe_class in SWAPS.items()}


def candidate_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's leaf Dense/EinsumDense layers (exact types, as Keras' float8), and recipe layers."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if not layer._layers and (type(layer) in SWAPS or isinstance(layer, _RecipeLayer))]


def layer_dims(layer) -> tuple[int, int]:
    """(K, N): the contraction and output size of the layer's 2-D matmul."""
    if isinstance(layer, keras.layers.EinsumDense):
        return einsum_dims(layer.equation, layer.kernel.shape)
    return tuple(layer.kernel.shape)


def high_precision_reason(layer) -> str | None:
    """Why the layer cannot take a recipe (it stays as it is), or None."""
    if type(layer) not in SWAPS and not isinstance(layer, _RecipeLayer):
        return f"{type(layer).__name__} is not Dense or EinsumDense"
    if not layer.built:
        return "not built"
    if layer.quantization_mode is not None:
        return f"already quantized ({layer.quantization_mode})"
    if layer.lora_enabled:
        return "LoRA is enabled"
    if isinstance(layer, keras.layers.EinsumDense):
        try:
            einsum_dims(layer.equation, layer.kernel.shape)
        except UnsupportedEquation as error:
            return str(error)
    return None


@dataclass
class Applied:
    """What apply_recipe did, by layer path."""

    recipe: Recipe
    layers: list[str] = field(default_factory=list)
    padded: dict[str, list[str]] = field(default_factory=dict)
    high_precision: dict[str, str] = field(default_factory=dict)


def apply_recipe(target, recipe: Recipe, track_scales: bool = True) -> Applied:
    """Run `recipe` in a built model's Dense/EinsumDense layers (or in the given layers, e.g.
    those a skip/only filter selected). A layer that cannot take it stays in high precision
    and is named with the reason; a block size that does not divide a layer's dims is padded.
    Apply before `compile`: the record is a new trainable variable the optimizer must know."""
    layers = candidate_layers(target) if isinstance(target, keras.Model) else list(target)
    applied = Applied(recipe)
    for layer in layers:
        reason = high_precision_reason(layer)
        if reason:
            applied.high_precision[layer.path or layer.name] = reason
            continue
        SWAPS.get(type(layer), type(layer)).adopt(layer, recipe, track_scales)
        applied.layers.append(layer.path)
        problems = indivisible(recipe, *layer_dims(layer))
        if problems:
            applied.padded[layer.path] = problems
    return applied


RECIPE_CLASS_NAMES = ("fp8exp>RecipeDense", "fp8exp>RecipeEinsumDense")


def is_recipe_layer(layer) -> bool:
    """By class, or by registered name: a model a pyfunc loaded with the copy of this module it
    ships holds that copy's classes, which fp8exp's checks must recognise all the same."""
    return isinstance(layer, _RecipeLayer) or keras.saving.get_registered_name(type(layer)) in RECIPE_CLASS_NAMES


def recipe_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model._flatten_layers(include_self=False) if is_recipe_layer(layer)]


def scale_metrics(model: keras.Model) -> dict[str, float]:
    """`fp8/<layer>/<tensor>_<stat>` from each recipe layer's record (zeros before the first
    training step): `_scale` and `_amax` for per-tensor recipes, every stats.COLUMNS otherwise.
    Reading it syncs the variables to the host: call it at logging points, not every step."""
    metrics = {}
    for layer in recipe_layers(model):
        if not layer.track_scales:
            continue
        values = np.asarray(ops.convert_to_numpy(layer.scale_stats.value), dtype=np.float64)
        for tensor, row in zip(RECORD_TENSORS, values):
            stats = dict(zip(COLUMNS, row.tolist()))
            if layer.recipe.name in PER_TENSOR:
                stats = {"scale": stats["scale_min"], "amax": stats["amax"]}
            metrics.update({f"fp8/{layer.path}/{tensor}_{key}": value for key, value in stats.items()})
    return metrics
