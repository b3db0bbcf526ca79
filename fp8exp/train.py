"""Fit and evaluate a compiled model, and time its training steps honestly."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import keras
import numpy as np
from omegaconf import DictConfig

from fp8exp.data import Splits


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
        # `batch` is the last step of the call, also with steps_per_execution > 1.
        self.step = self._epoch_start + batch + 1


class StepTimer(StepCallback):
    """Wall time of every training call. Keras turns the step's logs into Python floats
    before any callback sees them, which waits for the device, so each interval covers
    fetching the batch, the compiled step and its completion."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int, float]] = []  # (last step, steps in call, seconds)
        self._started = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._started
        previous = self.step
        super().on_train_batch_end(batch, logs)
        self.calls.append((self.step, self.step - previous, elapsed))

    def step_times(self, disturbed_steps=()) -> np.ndarray:
        """Seconds per optimizer step, leaving out the first call (tracing and compilation),
        the calls that ended at a disturbed step (a callback read the model there) and the
        calls right after them (which re-gather the model state)."""
        disturbed = set(disturbed_steps)
        times = []
        for index, (step, steps, seconds) in enumerate(self.calls):
            if index == 0 or step in disturbed or self.calls[index - 1][0] in disturbed:
                continue
            times.append(seconds / steps)
        return np.asarray(times)


@dataclass
class TrainResult:
    history: dict[str, list[float]]
    test: dict[str, float]
    timer: StepTimer

    @property
    def steps(self) -> int:
        return self.timer.step


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss: str,
                  trainer: DictConfig) -> None:
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"],
                  steps_per_execution=trainer.steps_per_execution)


def fit_and_evaluate(model: keras.Model, splits: Splits, trainer: DictConfig,
                     callbacks: list[keras.callbacks.Callback]) -> TrainResult:
    timer = StepTimer()
    history = model.fit(
        splits.x_train, splits.y_train,
        validation_data=(splits.x_val, splits.y_val),
        batch_size=trainer.batch_size,
        epochs=trainer.epochs,
        steps_per_epoch=trainer.steps_per_epoch,
        validation_steps=trainer.eval_steps,
        shuffle=True,
        callbacks=[timer, *callbacks],
        verbose=1 if sys.stdout.isatty() else 2,  # a progress bar for people, a line per epoch for logs
    )
    test = model.evaluate(splits.x_test, splits.y_test, batch_size=trainer.batch_size,
                          steps=trainer.eval_steps, return_dict=True, verbose=0)
    return TrainResult(
        history={key: [float(v) for v in values] for key, values in history.history.items()},
        test={key: float(value) for key, value in test.items()},
        timer=timer,
    )


def perf_metrics(result: TrainResult, batch_size: int, sequence_length: int,
                 disturbed_steps=()) -> dict[str, float]:
    """`perf/` metrics: medians are robust to the odd slow step a shared CPU produces.
    `disturbed_steps`: steps at which a callback read the model state."""
    times = result.timer.step_times(disturbed_steps)
    metrics = {"perf/peak_rss_mb": peak_rss_mb()}
    if result.timer.calls:
        metrics["perf/compile_s"] = result.timer.calls[0][2]
    if len(times):
        median = float(np.median(times))
        metrics.update({
            "perf/step_time_ms": median * 1e3,
            "perf/step_time_p90_ms": float(np.percentile(times, 90)) * 1e3,
            "perf/examples_per_s": batch_size / median,
            "perf/tokens_per_s": batch_size * sequence_length / median,
            "perf/timed_steps": float(len(times)),
        })
    return metrics


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
