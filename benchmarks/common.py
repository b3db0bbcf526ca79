"""Timing one configuration the way fp8exp times it, without Hydra or MLflow, so the GPU kit
and the size sweep need only JAX, Keras and keras-hub (never TensorFlow)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata

import jax
import keras
import numpy as np
from omegaconf import OmegaConf

import fp8exp  # noqa: F401  (selects the JAX backend)
from fp8exp.data.synthetic import generate
from fp8exp.models import classifier as model
from fp8exp.precision import gemm as fp8_gemm
from fp8exp.precision import policy as precision
from fp8exp.run import distribution, train


@dataclass
class Timing:
    precision: str
    hidden_dim: int
    sequence_length: int
    median_ms: float
    gemm: str
    fp8_matmuls: int
    fused: int
    recipe: str | None = None
    """float8's recipe (precision.recipe); None = delayed, Keras' own."""
    devices: int = 1
    """Data-parallel over this many devices, each with the same per-device batch."""


QUICK_RECIPES = ("delayed", "block")
"""--quick times Keras' own recipe and one of fp8exp's (recipes share one code path): that the code runs."""


def precision_config(name: str, recipe: str | None = None):
    """A `precision` config as conf/precision/<name>.yaml composes it (float8: from mixed_bfloat16,
    with `recipe`, each recipe's options at their defaults)."""
    fp8 = name == "float8"
    return OmegaConf.create(dict(name=name, skip=None, only=None, source_policy="mixed_bfloat16" if fp8 else None,
                                 recipe=recipe if fp8 else None, amax_history_length=None, margin=None,
                                 power_of_2_scales=None, block_size=None, grad_format=None))


def build(precision_name: str, hidden_dim: int, sequence_length: int, num_layers: int = 1,
          vocabulary_size: int = 20000, num_heads: int | None = None, recipe: str | None = None) -> keras.Model:
    heads = num_heads or (hidden_dim // 64 if hidden_dim >= 128 else 2)
    model_cfg = OmegaConf.create(dict(hidden_dim=hidden_dim, num_heads=heads, intermediate_dim=4 * hidden_dim
                                      if hidden_dim >= 512 else hidden_dim, num_layers=num_layers, dropout=0.1))
    precision_cfg = precision_config(precision_name, recipe)
    net = precision.build(precision_cfg, lambda: model.build_classifier(model_cfg, vocabulary_size, sequence_length, 2))
    net.compile(optimizer=precision.optimizer(precision_cfg, 1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    return net


class CallTimer(keras.callbacks.Callback):
    """A plain script's only callback: wall time per training call (`times`, seconds)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.started)


def load_times(load, attempts: int):
    """fp8exp's data path timed as `make bench` reports it: `load(attempt, cold)` into an empty cache
    (cold) then again from it (cached), `attempts` times. Returns (cold seconds, cached seconds, the splits)."""
    colds, cached = [], []
    for attempt in range(attempts):
        started = time.perf_counter()
        splits = load(attempt)
        colds.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert load(attempt).cache_hit
        cached.append(time.perf_counter() - started)
    return colds, cached, splits


def data_path_rows(keras_hub_label: str, vocabulary_s: float, keras_hub_s: float, fp8exp_label: str,
                   colds: list[float], cached: list[float]) -> list[list[str]]:
    """The data-path table's rows: keras-hub's way, fp8exp's cold (median and each run) and cached."""
    return [[keras_hub_label, f"{vocabulary_s:.1f}", f"{keras_hub_s:.1f}"],
            [fp8exp_label, "-", f"{statistics.median(colds):.2f} ({', '.join(f'{c:.2f}' for c in colds)})"],
            ["fp8exp, cached (fingerprint + load)", "-", f"{statistics.median(cached):.2f}"]]


def synthetic_batch_data(count: int, sequence_length: int, vocabulary_size: int = 20000, seed: int = 0):
    cfg = OmegaConf.create(dict(vocabulary_size=vocabulary_size, sequence_length=sequence_length,
                                num_classes=2, signal_tokens=8))
    return generate(np.random.default_rng(seed), count, cfg)


def time_steps(net: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int, steps: int) -> tuple[train.StepTimer, float]:
    """Warm up (compile) with one step, then `steps` timed steps: fp8exp's own step timer and
    the external wall time of the whole fit call divided by the steps."""
    first = keras.tree.map_structure(lambda a: a[:batch_size], x)  # arrays or a dict of them
    net.fit(first, y[:batch_size], batch_size=batch_size, epochs=1, verbose=0)
    timer = train.StepTimer()
    started = time.perf_counter()
    net.fit(x, y, batch_size=batch_size, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    jax.block_until_ready([v.value for v in net.trainable_variables])
    return timer, (time.perf_counter() - started) / steps


def measure(precision_name: str, hidden_dim: int, sequence_length: int, batch_size: int, steps: int,
            num_layers: int = 1, check_gemm: bool = True, recipe: str | None = None, devices: int = 1) -> Timing:
    """Median step time; with `devices` > 1, data-parallel (distribution=data_parallel's Keras
    DataParallel) over the first `devices` devices, `batch_size` rows on each."""
    strategy = keras.distribution.DataParallel(devices=jax.devices()[:devices]) if devices > 1 else None
    batch_size *= devices
    with distribution.scope(strategy):
        net = build(precision_name, hidden_dim, sequence_length, num_layers, recipe=recipe)
        x, y = synthetic_batch_data(batch_size * steps, sequence_length)
        timer, _ = time_steps(net, x, y, batch_size, steps)
        report = fp8_gemm.inspect_train_step(net, x[:batch_size], y[:batch_size]) \
            if check_gemm and precision_name == "float8" else None
    median = float(np.median(timer.step_times()))  # the timed fit's first call is left out as if it compiled
    return Timing(precision_name, hidden_dim, sequence_length, median * 1e3, report.verdict if report else "-",
                  report.fp8_matmuls if report else 0, report.fused if report else 0, recipe, devices)


def machine() -> str:
    devices = jax.devices()
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("keras", "keras-hub", "jax"))
    return (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
            f"{devices[0].platform}:{devices[0].device_kind} x{len(devices)}; Python {platform.python_version()}; "
            f"{versions}, Keras backend {keras.backend.backend()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine skews timings)")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def size_table(timings: list[Timing], baseline: str = "mixed_bfloat16") -> str:
    """One row per (size, sequence): median ms/step per precision and FP8's speedup over BF16."""
    keyed = {(t.hidden_dim, t.sequence_length, t.precision): t for t in timings}
    precisions = sorted({t.precision for t in timings}, key=["float32", "mixed_bfloat16", "float8"].index)
    rows = []
    for hidden, length in sorted({(t.hidden_dim, t.sequence_length) for t in timings}):
        cells = [hidden, length] + [f"{keyed[(hidden, length, p)].median_ms:.2f}" for p in precisions]
        fp8, base = keyed.get((hidden, length, "float8")), keyed.get((hidden, length, baseline))
        cells.append(f"{base.median_ms / fp8.median_ms:.2f}x" if fp8 and base else "-")
        cells.append(f"{fp8.gemm} ({fp8.fused}/{fp8.fp8_matmuls})" if fp8 else "-")
        rows.append(cells)
    return markdown_table(["hidden", "seq"] + [f"{p} ms" for p in precisions] + ["fp8 speedup vs bf16", "FP8 GEMMs"], rows)


def recipe_table(timings: list[Timing]) -> str:
    """One row per (size, FP8 recipe): median ms/step, its cost against delayed (Keras' own
    recipe) and its speed-up over mixed_bfloat16 where that was timed, and the GEMM check."""
    keyed = {(t.hidden_dim, t.precision, t.recipe or "delayed"): t for t in timings}
    rows = []
    for hidden in sorted({t.hidden_dim for t in timings}):
        delayed, bf16 = keyed.get((hidden, "float8", "delayed")), keyed.get((hidden, "mixed_bfloat16", "delayed"))
        for t in (t for t in timings if t.hidden_dim == hidden and t.precision == "float8"):
            rows.append([hidden, t.recipe or "delayed", f"{t.median_ms:.2f}",
                         f"{t.median_ms / delayed.median_ms:.2f}x" if delayed else "-",
                         f"{bf16.median_ms / t.median_ms:.2f}x" if bf16 else "-",
                         f"{t.gemm} ({t.fused}/{t.fp8_matmuls})" if t.gemm != "-" else "-"])
    return markdown_table(["hidden", "recipe", "ms/step", "cost vs delayed", "speed-up vs bf16", "FP8 GEMMs"], rows)
