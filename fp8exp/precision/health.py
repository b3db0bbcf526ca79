"""Is FP8 healthy, and where does it apply: warnings for scales and histories that went wrong or
tensors that saturate or underflow, and which layers FP8 covers, by parameters and matmul FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import keras
import numpy as np

from fp8exp.precision.probe import Capture
from fp8exp.precision.recipes.layers import RECORD, is_recipe_layer
from fp8exp.precision.scales import recipe_records, scale_variables


@dataclass
class Health:
    """Findings by check, each a list of `<layer>/<tensor>`; empty means healthy."""

    findings: dict[str, list[str]] = field(default_factory=dict)

    def add(self, check: str, where: str) -> None:
        self.findings.setdefault(check, []).append(where)

    def tags(self) -> dict[str, str]:
        tags = {"fp8.health": "warn" if self.findings else "ok"}
        tags.update({f"fp8.health.{check}": ", ".join(where)[:5000] for check, where in self.findings.items()})
        return tags

    def messages(self) -> list[str]:
        explain = {
            "scale_never_moved": "scale still at its initial 1.0 (tensor never seen, or FP8 not applied)",
            "amax_zero": "amax history all zero (values underflowed; delayed scaling quantized them with the initial scale)",
            "non_finite": "NaN or Inf in scale or amax history (recipe layers: in their scale record)",
            "at_bound": "block scales at the limit of their range above the warning threshold (the scale could "
                        "not follow the data: power-of-2 / E8M0 exponent clamped)",
            "saturation": "saturation above the warning threshold",
            "underflow": "flush-to-zero above the warning threshold",
        }
        return [f"FP8 {explain[check]}: {', '.join(where[:6])}{' ...' if len(where) > 6 else ''}"
                for check, where in self.findings.items()]


def check_health(model: keras.Model, probe_metrics: dict[str, float], threshold: float,
                 sizes: dict[str, int] | None = None) -> Health:
    """Saturation and underflow warn above `threshold` and when more than one element is hit:
    with delayed scaling a growing tensor's single largest value clips by design. Recipe layers
    are judged by their scale record: non-finite, never written, an all-zero tensor, and the
    share of blocks whose scale sits at its bound (`at_bound`) above `threshold`."""
    health = Health()
    for entry in scale_variables(model):
        where = f"{entry.layer}/{entry.tensor}"
        scale = keras.ops.convert_to_numpy(entry.scale.value)
        history = keras.ops.convert_to_numpy(entry.amax_history.value)
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(history))):
            health.add("non_finite", where)
            continue
        if float(scale) == 1.0:
            health.add("scale_never_moved", where)
        if not np.any(history):
            health.add("amax_zero", where)
    for layer, tensors in recipe_records(model).items():  # recipe layers: their last step's record
        for tensor, stats in tensors.items():
            where = f"{layer}/{tensor}"
            if not all(math.isfinite(value) for value in stats.values()):
                health.add("non_finite", where)
            elif not any(stats.values()):
                health.add("scale_never_moved", where)  # no step wrote the record
            elif stats["amax"] == 0:
                health.add("amax_zero", where)
            elif stats["at_bound"] > threshold:
                health.add("at_bound", where)
    for key, value in probe_metrics.items():
        for check in ("saturation", "underflow"):
            if key.endswith(f"_{check}"):
                where = key[len("fp8/"):-len(f"_{check}")]
                if value > threshold and value * (sizes or {}).get(where, math.inf) > 1:
                    health.add(check, where)
    return health


def _sharding(layer) -> str:
    """How the layer's main weight (kernel, else embeddings, else its first) lies on the devices:
    `one device`, `replicated`, or `sharded (None, 'model')` (its PartitionSpec, by axis)."""
    weight = next((getattr(layer, name) for name in ("kernel", "embeddings") if hasattr(layer, name)), layer.weights[0])
    sharding = getattr(getattr(weight, "value", None), "sharding", None)
    if sharding is None or len(sharding.device_set) == 1:
        return "one device"
    spec = getattr(sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        return "replicated"
    return f"sharded {tuple(spec)}"


def layer_table(model: keras.Model, captures: dict[str, Capture],
                shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """Markdown: every layer with weights, whether FP8 covers it (the captured layers), its
    parameters and its share of the model's matmul FLOPs per example, from `shapes`: every
    Dense/EinsumDense layer's output shape (Probe.matmul_shapes; default: the captured ones only).
    Counted in high precision, never FP8: every attention's score matmuls (QK^T and AV: keras
    MultiHeadAttention, Llama's and Gemma's own attention layers alike) and a language model's
    output projection, the token embedding used in reverse (tied or not). Over several devices
    (distribution=data_parallel, fsdp, model_parallel) a column says how each layer's weight lies."""
    quantized = set(captures)
    shapes = shapes or {path: capture.output_shape for path, capture in captures.items()}
    rows = []
    length = next((shape[1] for shape in shapes.values() if len(shape) > 2), 0)
    lm_head = getattr(getattr(model, "backbone", None), "token_embedding", None) if hasattr(model, "generate") else None
    for layer in model._flatten_layers(include_self=False):
        query = next((getattr(layer, name) for name in ("query_dense", "_query_dense")
                      if isinstance(getattr(layer, name, None), keras.layers.Layer)), None)
        if query is not None and query.path in shapes:
            _, length, heads, head_dim = shapes[query.path]
            rows.append((f"{layer.path} (scores QK^T and AV)", "attention matmul", "compute dtype", 0,
                         2 * 2 * length * length * heads * head_dim, "activations"))
        if layer._layers or not layer.weights:
            continue
        params = sum(int(np.prod(w.shape)) for w in layer.weights
                     if not w.path.endswith(("_scale", "_amax_history", f"/{RECORD}")))
        flops = 0
        if layer.path in shapes:
            output_elements = int(np.prod(shapes[layer.path][1:]))
            kernel = layer.kernel.shape
            contracted = int(np.prod(kernel)) // int(np.prod(_kernel_output_dims(layer, kernel)))
            flops = 2 * output_elements * contracted
        policy = layer.dtype_policy.name
        if is_recipe_layer(layer):  # e.g. float8_block_from_mixed_bfloat16, as Keras names its float8 policies
            policy = f"float8_{layer.recipe.name}_from_{policy}"
        rows.append((layer.path, type(layer).__name__, policy, params, flops, _sharding(layer)))
        if layer is lm_head:
            vocabulary, hidden = layer.embeddings.shape
            rows.append((f"{layer.path} (in reverse: the output projection)", "LM head matmul", "compute dtype",
                         0, 2 * length * hidden * vocabulary, "as the embedding"))
    total_flops = sum(row[4] for row in rows) or 1
    fp8_flops = sum(row[4] for row in rows if row[0] in quantized)
    spread = any(row[5] not in ("one device", "activations", "as the embedding") for row in rows)
    lines = ["| layer | type | dtype policy | params | matmul FLOPs share |" + (" sharding |" if spread else ""),
             "| --- | --- | --- | ---: | ---: |" + (" --- |" if spread else "")]
    lines += [f"| {path} | {kind} | {policy} | {params:,} | {flops / total_flops:.1%} |" + (f" {where} |" if spread else "")
              for path, kind, policy, params, flops, where in rows]
    lines.append(f"\nFP8 covers {len(quantized)} layers and {fp8_flops / total_flops:.1%} of the matmul FLOPs.")
    return "\n".join(lines) + "\n"


def _kernel_output_dims(layer, kernel_shape) -> list[int]:
    """Kernel dimensions that survive into the output (the rest are contracted)."""
    if isinstance(layer, keras.layers.EinsumDense):
        inputs, output = layer.equation.split("->")
        kernel_spec = inputs.split(",")[1]
        return [size for letter, size in zip(kernel_spec, kernel_shape) if letter in output]
    return [kernel_shape[-1]]
