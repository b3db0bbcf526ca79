"""Keras callbacks that observe training for the tracker: the optimizer step every observer
shares, epoch metrics, and the FP8 scaling state at log points. They only read; on JAX a
callback that touches `self.model` forces a device-to-host sync, so that happens only at
log points."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

import keras

from fp8exp.precision.scales import state_metrics


class StepCallback(keras.callbacks.Callback):
    """Counts optimizer steps across epochs (what `optimizer.iterations` holds) without
    reading the model, which on JAX would force a device-to-host state sync."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self._epoch_start = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step of the call with steps_per_execution > 1, except that Keras
        # reports `begin + steps_per_execution - 1` for an epoch's short last call too: the
        # epoch's batch count (`params["steps"]`) caps it at the steps that really ran.
        batches = (self.params or {}).get("steps")
        self.step = self._epoch_start + (batch + 1 if batches is None else min(batch + 1, batches))


def metric_key(keras_key: str) -> str:
    """Keras epoch-log keys -> the prefixes the MLflow UI groups charts by: `val_loss` -> `val/loss`."""
    return "val/" + keras_key[len("val_"):] if keras_key.startswith("val_") else "train/" + keras_key


HOST_TAG, PID_TAG, PIDNS_TAG, HEARTBEAT_TAG = "fp8exp.host", "fp8exp.pid", "fp8exp.pidns", "fp8exp.heartbeat"
HEARTBEAT_S = 60.0


def pid_namespace() -> str:
    """The pid namespace's id: containers sharing a host name can have pid spaces of their own."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def process_tags() -> dict[str, str]:
    """Which process runs the run: with the heartbeat, how trainer.resume tells a run that is
    training from one whose process was killed without a word."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PIDNS_TAG: pid_namespace(),
            HEARTBEAT_TAG: f"{time.time():.0f}"}


class Heartbeat(keras.callbacks.Callback):
    """Tag `fp8exp.heartbeat` (Unix seconds) at most every HEARTBEAT_S while training or validating,
    and send the metrics buffered since the last flush (the system metrics of a long epoch): one
    tag write and one metrics batch a minute, no model read."""

    def __init__(self, run, every_s: float = HEARTBEAT_S):
        super().__init__()
        self.run = run
        self.every_s = every_s
        self._last = time.monotonic()

    def _beat(self) -> None:
        # While the store is away a beat would only wait on the queue's head (a checkpoint upload, say).
        if time.monotonic() - self._last >= self.every_s and not self.run.in_outage:
            self._last = time.monotonic()
            self.run.set_tags({HEARTBEAT_TAG: f"{time.time():.0f}"})
            self.run.flush()

    def on_train_batch_end(self, batch, logs=None):
        self._beat()

    def on_test_batch_end(self, batch, logs=None):
        self._beat()


class EpochLogger(keras.callbacks.Callback):
    """`train/*` and `val/*` metrics at the end of every epoch (step = epoch number, from 1)."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        self.run.log_metrics({metric_key(k): v for k, v in (logs or {}).items()}, step=epoch + 1)
        self.run.flush()


class StepLogger(StepCallback):
    """Loss curves finer than an epoch, at MLflow step = optimizer step: every `train_every` steps
    the training metrics' mean over those steps (`train/loss_step`, ...), and every `val_every`
    steps what `validate(model)` returns (`val/loss_step`, ...). Keras' logs hold each metric's
    running mean since the epoch began, weighted by examples; a window's mean is recovered from
    two of them and the examples between (fit's params `batch_size` and `samples`: a partial last
    batch weighs less), and steps an epoch ends with before a log point are carried into the next
    window. No model read for that. `derive(metrics)` adds derived values (a language model's
    perplexity). `validate(model)` reads the model (a state sync): its steps are listed in
    `disturbed` for the step timer to skip."""

    def __init__(self, run, train_every: int | None = None, val_every: int | None = None,
                 validate: Callable[[keras.Model], dict[str, float]] | None = None,
                 derive: Callable[[dict[str, float]], dict[str, float]] = dict):
        super().__init__()
        self.run, self.train_every, self.val_every = run, train_every, val_every
        self.validate, self.derive = validate, derive
        self.disturbed: list[int] = []
        self._mark: tuple[int, dict[str, float]] = (0, {})  # (examples into the epoch, running means)
        self._last: tuple[int, dict[str, float]] = (0, {})
        self._carry: tuple[int, dict[str, float]] = (0, {})  # (examples, sums) since the last log point

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        (seen, means), (then, marked) = self._last, self._mark
        count, sums = self._carry
        if seen > then:  # the epoch ended between log points: its last steps go into the next window
            self._carry = (count + seen - then, {key: sums.get(key, 0.0) + means[key] * seen - marked.get(key, 0.0) * then
                                                 for key in means})
        self._mark = self._last = (0, {})

    def on_train_batch_end(self, batch, logs=None):
        previous = self.step
        super().on_train_batch_end(batch, logs)
        params = self.params or {}
        size = params.get("batch_size", 1)
        seen = min((self.step - self._epoch_start) * size, params.get("samples", float("inf")))
        self._last = (seen, {key: float(value) for key, value in (logs or {}).items() if isinstance(value, (int, float))})
        if self.train_every and self.step // self.train_every > previous // self.train_every:
            self._log_train()
        if self.val_every and self.validate and self.step // self.val_every > previous // self.val_every:
            metrics = {f"val/{key}_step": value for key, value in self.derive(self.validate(self.model)).items()}
            self.run.log_metrics(metrics, step=self.step)
            self.disturbed.append(self.step)

    def _log_train(self) -> None:
        (seen, means), (then, marked), (count, sums) = self._last, self._mark, self._carry
        examples = count + seen - then
        window = {key: (sums.get(key, 0.0) + value * seen - marked.get(key, 0.0) * then) / examples
                  for key, value in means.items()}
        self.run.log_metrics({f"train/{key}_step": value for key, value in self.derive(window).items()},
                             step=self.step)
        self._mark, self._carry = self._last, (0, {})


class Fp8StateLogger(StepCallback):
    """Sends FP8 state to `sink(metrics, step)` every `every` optimizer steps and at the end.

    On JAX, `self.model` copies the training state back into the Keras variables, so it is
    touched only at log points, which are listed in `logged_steps` for the step timer to skip.
    """

    def __init__(self, every: int, sink: Callable[[dict[str, float], int], None], probe=None):
        super().__init__()
        self.every = every
        self.sink = sink
        self.probe = probe
        """Optional object whose `metrics()` adds probe-batch diagnostics at each log point."""
        self.probe_metrics: dict[str, float] = {}
        self.probe_seconds = 0.0
        self.logged_steps: list[int] = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        last = self.logged_steps[-1] if self.logged_steps else 0
        if self.step // self.every > last // self.every:
            self._log()

    def on_train_end(self, logs=None):
        if not self.logged_steps or self.logged_steps[-1] != self.step:
            self._log()

    def _log(self):
        metrics = state_metrics(self.model)  # Keras scales and recipe layers' scale records
        if self.probe is not None:
            started = time.perf_counter()
            self.probe_metrics = self.probe.metrics()
            self.probe_seconds += time.perf_counter() - started
            metrics.update(self.probe_metrics)
        self.sink(metrics, self.step)
        self.logged_steps.append(self.step)
