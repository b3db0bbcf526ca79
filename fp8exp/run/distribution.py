"""Several devices, in one process or several (processes.py): Keras' distribution API on JAX.
`data_parallel` replicates the model over the batch axis; `model_parallel` also shards the
Transformer's dense kernels over a `model` axis. FP8 scales and amax histories are scalars and
short vectors: they match no layout rule and stay replicated, so every device quantizes with the
same scale."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import keras
import numpy as np
from omegaconf import DictConfig

from fp8exp.config import ConfigError
from fp8exp.config.distribution import check_processes_fit
from fp8exp.precision.readback import held_whole, on_host
from fp8exp.precision.scales import is_fp8_state
from fp8exp.run import checkpoint, processes
from fp8exp.run.resume import Resume, logged_params

log = logging.getLogger(__name__)

# Megatron-style sharding: column-parallel in, row-parallel out (kernel axes per layer type). The
# reference classifier, GPT-2 and BERT share keras-hub's Transformer layer names; Llama adds a gate,
# Gemma names its own (kernels (heads, hidden, head_dim) and (heads, head_dim, hidden)). Keras
# matches whole paths, so a kernel's FP8 `kernel_scale` / `kernel_amax_history` stay replicated.
KERNEL_LAYOUTS = {
    r".*token_embedding/embeddings": (None, "model"),
    r".*self_attention/(query|key|value)/kernel": (None, "model", None),
    r".*self_attention/attention_output/kernel": ("model", None, None),
    r".*feedforward_(intermediate|gate)_dense/kernel": (None, "model"),
    r".*feedforward_output_dense/kernel": ("model", None),
    r".*decoder_block_\d+/attention/(query|key|value|attention_output)/kernel": ("model", None, None),
    r".*ffw_gating(_2)?/kernel": (None, "model"),
    r".*ffw_linear/kernel": ("model", None),
}


def start(cfg: DictConfig, here: processes.Processes, resume: Resume | None) -> Resume | None:
    """Several processes: meet (the same config everywhere), start JAX over all their devices,
    and watch each other. Process 0 found the checkpoint to resume from (it alone reads MLflow):
    every process gets its state. Returns this process's Resume (None: a new run)."""
    check_processes_fit(cfg.distribution, here.count)  # the config check did, unless the cluster set the count
    payload = checkpoint.encode(resume.state) if resume is not None else b""
    # Every setting must match, even those a resumption ignores (eval_every_steps runs collectives).
    params = {key: value for key, value in logged_params(cfg).items() if key not in processes.NOT_COMPARED}
    payload = processes.start(here, params, payload, cfg.distribution.timeout_s)
    processes.watch(here)
    if here.lead or not payload:
        return resume
    return Resume("", checkpoint.decode(payload), "")


def fsdp_axes(shape: tuple[int, ...], ways: int) -> tuple[str | None, ...]:
    """fsdp's layout of one variable: a matrix or higher (kernels, embeddings) is split along its
    largest axis that `ways` divides; vectors (biases, norms, FP8 scales and amax histories) and
    matrices with no such axis stay whole on every device."""
    spec: list[str | None] = [None] * len(shape)
    fitting = [axis for axis, size in enumerate(shape) if size % ways == 0] if len(shape) >= 2 else []
    if fitting:
        spec[max(fitting, key=lambda axis: shape[axis])] = "batch"
    return tuple(spec)


class FullySharded(keras.distribution.ModelParallel):
    """`distribution=fsdp`: batches and weights split over one `batch` axis (ZeRO-3 / FSDP). The
    optimizer's moments take their weight's layout (Keras creates them from it), so they are
    split too; XLA gathers each weight where a step uses it. FP8 bookkeeping is never split (a
    recipe's (3, 6) scale record would be, over 2, 3 or 6 devices)."""

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is not None:
            return variable._layout
        shape = tuple(variable.shape)
        axes = (None,) * len(shape) if is_fp8_state(variable) else fsdp_axes(shape, self.device_mesh.shape[0])
        return keras.distribution.TensorLayout(axes, self.device_mesh)


def _devices(distribution: DictConfig) -> list:
    available = keras.distribution.list_devices()
    if processes.count() > 1:
        return available  # every device of every process (check_processes_fit)
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
    if model.get("num_key_value_heads"):  # Llama, Gemma: key and value kernels are split by their heads
        sizes["model.num_key_value_heads"] = model.num_key_value_heads
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
    # Several processes: each feeds its own rows of every batch (train.process_rows), already split.
    sharded = {"auto_shard_dataset": False} if processes.count() > 1 else {}
    if distribution.name == "data_parallel":
        return keras.distribution.DataParallel(devices=devices, **sharded)
    if distribution.name == "fsdp":
        mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
        return FullySharded(layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch", **sharded)
    batch, model = distribution.mesh_shape or (1, len(devices))
    if batch * model != len(devices):
        raise ConfigError("distribution.mesh_shape", f"[{batch}, {model}] needs {batch * model} devices, "
                          f"{len(devices)} are in use")
    check_model_axis(model_cfg, model, len(devices))
    mesh = keras.distribution.DeviceMesh((batch, model), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, layout in KERNEL_LAYOUTS.items():
        layout_map[pattern] = layout
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch", **sharded)


def batch_ways(strategy) -> int:
    """How many devices split each batch."""
    if strategy is None:
        return 1
    mesh = strategy.device_mesh
    return mesh.shape[mesh.axis_names.index("batch")]


def check_batch(strategy, batch_size: int) -> None:
    ways = batch_ways(strategy)
    if batch_size % ways:
        where = f" of {processes.count()} processes" if processes.count() > 1 else ""
        raise ConfigError("trainer.batch_size", f"{batch_size} does not split evenly over the {ways} devices "
                          f"of the batch axis{where}; use a multiple of {ways}")


def data_share(strategy) -> tuple[int, int]:
    """(i, n): this process feeds the i-th of n equal slices of every global batch, the rows its
    devices hold (jax.make_array_from_process_local_data, Keras' input path, places them); (0, 1)
    with one process, or where every process holds the whole batch (a batch axis inside one process)."""
    if strategy is None or processes.count() == 1:
        return 0, 1
    import jax

    owner = {f"{d.platform}:{d.id}": d.process_index for d in jax.devices()}
    mesh = strategy.device_mesh
    rows = np.moveaxis(np.asarray(mesh.devices), mesh.axis_names.index("batch"), 0).reshape(batch_ways(strategy), -1)
    mine = [i for i, row in enumerate(rows) if any(owner[str(d)] == jax.process_index() for d in row)]
    held = len(mine)
    if mine != list(range(mine[0], mine[0] + held)) or len(rows) % held or mine[0] % held:
        raise ConfigError("distribution.mesh_shape", f"this process's devices hold batch rows {mine} of "
                          f"{len(rows)}, not one contiguous block; order the mesh [batch, model] by process")
    return mine[0] // held, len(rows) // held


@contextlib.contextmanager
def whole_weights(model: keras.Model) -> Iterator[None]:
    """For a save, every weight that fsdp or model_parallel split over processes is whole, as
    numpy on the host (read only: no device holds the whole model); process 0 alone keeps the
    copies, as it alone saves. The split values return after. Every process must enter together
    (a gather per weight); a no-op when no weight is split over processes."""
    import jax

    split = [v for v in model.variables if not held_whole(v.value)]
    kept = [v.value for v in split]
    for variable, value in zip(split, kept):
        whole = on_host(value)
        if jax.process_index() == 0:
            variable._value = whole  # Keras' assign() would split it again by the variable's layout
    try:
        yield
    finally:
        for variable, value in zip(split, kept):
            variable._value = value


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
