"""The distribution group's rules: device meshes, and several processes training one run. Pure
config (nothing heavy loads), so a process id out of range fails before JAX starts."""

from __future__ import annotations

from omegaconf import DictConfig

from fp8exp.config.errors import ConfigError
from fp8exp.config.schema import DISTRIBUTIONS

LAUNCH_KEYS = ("coordinator", "num_processes", "process_id")


def check_distribution(cfg: DictConfig) -> None:
    distribution = cfg.distribution
    if distribution.name not in DISTRIBUTIONS:
        raise ConfigError("distribution.name", f"unknown distribution {distribution.name!r}; "
                          f"valid: {', '.join(DISTRIBUTIONS)}")
    for key in ("devices", "num_processes"):
        if distribution.get(key) is not None and distribution[key] < 1:
            raise ConfigError(f"distribution.{key}", f"got {distribution[key]}, expected a positive integer or null")
    if distribution.mesh_shape is not None:
        if distribution.name != "model_parallel":
            raise ConfigError("distribution.mesh_shape", f"only applies to distribution=model_parallel, "
                              f"not {distribution.name}; remove it")
        if len(distribution.mesh_shape) != 2 or min(distribution.mesh_shape) < 1:
            raise ConfigError("distribution.mesh_shape", f"got {list(distribution.mesh_shape)}, expected "
                              "[batch, model] with positive sizes")
    _check_processes(distribution)


def _check_processes(distribution: DictConfig) -> None:
    given = [key for key in LAUNCH_KEYS if distribution.get(key) is not None]
    if not given or given == ["num_processes"] and distribution.num_processes == 1:
        return
    missing = [f"distribution.{key}" for key in LAUNCH_KEYS if key not in given]
    if missing:
        raise ConfigError(missing[0], f"several processes need all of distribution.{', distribution.'.join(LAUNCH_KEYS)} "
                          f"(missing: {', '.join(missing)}); or none of them under SLURM, where JAX detects them")
    count, index = distribution.num_processes, distribution.process_id
    if not 0 <= index < count:
        raise ConfigError("distribution.process_id", f"got {index}, expected 0 .. {count - 1} "
                          f"(distribution.num_processes={count})")
    host, _, port = str(distribution.coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("distribution.coordinator", f"got {distribution.coordinator!r}, expected host:port of "
                          "process 0, e.g. 10.0.0.1:12355")
    if count > 1:
        check_processes_fit(distribution, count)
    if distribution.timeout_s <= 0:
        raise ConfigError("distribution.timeout_s", f"got {distribution.timeout_s}, expected a positive number of seconds")


def check_processes_fit(distribution: DictConfig, count: int) -> None:
    """`count` processes (the config's, or the cluster's once detected) train on every device of
    every process: a distribution that uses one, or a device count, does not fit."""
    if distribution.name == "none":
        raise ConfigError("distribution.name", f"{count} processes need distribution=data_parallel, model_parallel "
                          "or fsdp; none trains on one device")
    if distribution.devices is not None:
        raise ConfigError("distribution.devices", f"got {distribution.devices}, but {count} processes train on every "
                          "device of every process; leave it null (a process's devices are its cluster's choice, "
                          "or CUDA_VISIBLE_DEVICES')")
