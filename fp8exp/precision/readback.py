"""Reading a value back on the host, whole, wherever it lies: one process holds it (on one device
or several), or it is split over several processes (fsdp, model_parallel) and a gather assembles
it. Saving, checkpoints, the FP8 probe and what-if read weights this way, one variable at a time
(a gather replicates only that one on the devices)."""

from __future__ import annotations

import keras
import numpy as np


def held_whole(value) -> bool:
    """Does this process hold all of `value` (one process, or replicated over processes)?"""
    return getattr(value, "is_fully_addressable", True) or getattr(value, "is_fully_replicated", False)


def on_host(value) -> np.ndarray:
    """`value` (an array or a Keras variable) whole, as numpy. Split over several processes, it
    is gathered: a collective, which every process enters in the same order."""
    if isinstance(value, keras.Variable):
        value = value.value
    if held_whole(value):
        return np.asarray(keras.ops.convert_to_numpy(value))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
