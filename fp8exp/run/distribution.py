"""Several devices, one process: Keras' distribution API on JAX. `data_parallel` replicates the
model over the batch axis; `model_parallel` also shards the Transformer's dense kernels over a
`model` axis. FP8 scales and amax histories are scalars and short vectors: they match no
layout rule and stay replicated, so every device quantizes with the same scale."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import keras
from omegaconf import DictConfig

from fp8exp.config import ConfigError

log = logging.getLogger(__name__)

# Megatron-style sharding: column-parallel in, row-parallel out (kernel axes per layer type).
KERNEL_LAYOUTS = {
    r".*token_embedding/embeddings": (None, "model"),
    r".*self_attention/(query|key|value)/kernel": (None, "model", None),
    r".*self_attention/attention_output/kernel": ("model", None, None),
    r".*feedforward_intermediate_dense/kernel": (None, "model"),
    r".*feedforward_output_dense/kernel": ("model", None),
}


def _devices(distribution: DictConfig) -> list:
    available = keras.distribution.list_devices()
    count = distribution.devices or len(available)
    if count > len(available):
        raise ConfigError("distribution.devices", f"asks for {count} devices, {len(available)} are available "
                          f"({', '.join(map(str, available))})")
    return available[:count]


def check_model_axis(model: DictConfig, ways: int, devices: int) -> None:
    """The sharded dimensions (embedding width, attention heads, feed-forward width: see
    KERNEL_LAYOUTS) must divide by the model axis, or JAX fails later with IndivisibleError."""
    sizes = {"model.num_heads": model.num_heads, "model.hidden_dim": model.hidden_dim,
             "model.intermediate_dim": model.intermediate_dim}
    for key, size in sizes.items():
        if size % ways:
            fitting = [d for d in range(1, devices + 1)
                       if devices % d == 0 and all(s % d == 0 for s in sizes.values())]
            raise ConfigError("distribution.mesh_shape", f"the model axis has {ways} devices, but {key}={size} does "
                              f"not divide by {ways}; use a model axis of {' or '.join(map(str, fitting))} "
                              f"(distribution.mesh_shape=[batch, model]) or a {key} that {ways} divides")


def make(distribution: DictConfig, model_cfg: DictConfig):
    """The Keras distribution for `distribution.name`, or None for one device. Checked before any
    data loads: a mesh that cannot shard this model is a config error."""
    if distribution.name == "none":
        return None
    devices = _devices(distribution)
    if distribution.name == "data_parallel":
        return keras.distribution.DataParallel(devices=devices)
    batch, model = distribution.mesh_shape or (1, len(devices))
    if batch * model != len(devices):
        raise ConfigError("distribution.mesh_shape", f"[{batch}, {model}] needs {batch * model} devices, "
                          f"{len(devices)} are in use")
    check_model_axis(model_cfg, model, len(devices))
    mesh = keras.distribution.DeviceMesh((batch, model), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, layout in KERNEL_LAYOUTS.items():
        layout_map[pattern] = layout
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def batch_ways(strategy) -> int:
    """How many devices split each batch."""
    if strategy is None:
        return 1
    mesh = strategy.device_mesh
    return mesh.shape[mesh.axis_names.index("batch")]


def check_batch(strategy, batch_size: int) -> None:
    ways = batch_ways(strategy)
    if batch_size % ways:
        raise ConfigError("trainer.batch_size", f"{batch_size} does not split evenly over the {ways} devices "
                          f"of the batch axis; use a multiple of {ways}")


@contextlib.contextmanager
def scope(strategy) -> Iterator[None]:
    """Build, train and evaluate under `strategy`; restore the previous distribution after."""
    if strategy is None:
        yield
        return
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(strategy)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)
