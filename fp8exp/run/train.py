"""Fit and evaluate a compiled model, and time its training steps honestly."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import jax
import keras
import numpy as np
from omegaconf import DictConfig

from fp8exp.data import Splits
from fp8exp.run import distribution
from fp8exp.tracking.callbacks import StepCallback


def _count_compilations() -> list[int]:
    """A counter JAX bumps whenever it traces or compiles a program (jax.monitoring events), so a
    timed call can tell that it compiled: the first call, and any later one with a new shape."""
    counter = [0]

    def listen(event: str, duration: float, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            counter[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    return counter


COMPILATIONS = _count_compilations()


@dataclass
class Call:
    """One training call: the optimizer step it ended at, how many steps it ran, its wall time,
    whether JAX compiled during it (then it measures the compiler, not a step), whether it ran
    a partial last batch (less work than a step), and whether it opened an epoch (it re-gathers
    the state that validation synced back to the host)."""

    step: int
    steps: int
    seconds: float
    compiled: bool
    partial: bool = False
    opens_epoch: bool = False

    @property
    def timed(self) -> bool:
        return not (self.compiled or self.partial or self.opens_epoch)


class StepTimer(StepCallback):
    """Wall time of every training call. Keras turns the step's logs into Python floats
    before any callback sees them, which waits for the device, so each interval covers
    fetching the batch, the compiled step and its completion."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []
        self._started = 0.0
        self._compilations = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._compilations = COMPILATIONS[0]
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._started
        previous = self.step
        super().on_train_batch_end(batch, logs)
        params = self.params or {}
        compiled = not self.calls or COMPILATIONS[0] != self._compilations
        partial = bool(params.get("partial_last")) and self.step - self._epoch_start == params.get("steps")
        self.calls.append(Call(self.step, self.step - previous, elapsed, compiled, partial,
                               opens_epoch=previous == self._epoch_start and bool(self.calls)))

    def step_times(self, disturbed_steps=()) -> np.ndarray:
        """Seconds per optimizer step over the calls that ran full compiled steps (see Call),
        leaving out too the calls that ended at a disturbed step (a callback read the model there)
        and the calls right after them (which re-gather the model state)."""
        disturbed = set(disturbed_steps)
        times = []
        for index, call in enumerate(self.calls):
            if not call.timed or call.step in disturbed or (index and self.calls[index - 1].step in disturbed):
                continue
            times.append(call.seconds / call.steps)
        return np.asarray(times)

    @property
    def compile_seconds(self) -> float:
        """Wall time of the calls that compiled."""
        return sum(call.seconds for call in self.calls if call.compiled)


def process_rows(rows: np.ndarray, batch_size: int, share: tuple[int, int]) -> np.ndarray:
    """The rows this process feeds: with `share` (i, n) (distribution.data_share), the i-th of n
    equal slices of every batch of `batch_size` rows. Every process cuts the same global batches
    from the same order, so the run trains on what one process with all the devices would."""
    index, count = share
    if count == 1:
        return rows
    starts = np.arange(0, len(rows), batch_size)
    return np.concatenate([np.array_split(rows[start:start + batch_size], count)[index] for start in starts])


def _fed(share: tuple[int, int], x, y, batch_size: int):
    """(inputs, labels, per-process batch size) for Keras: this process's rows of every batch."""
    rows = process_rows(np.arange(len(y)), batch_size, share)
    return (x if share[1] == 1 else x[rows]), (y if share[1] == 1 else y[rows]), batch_size // share[1]


def as_they_are(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split rows as model inputs and labels unchanged (the reference classifier's batches)."""
    return x, y


@dataclass
class TrainResult:
    test: dict[str, float]
    timer: StepTimer

    @property
    def steps(self) -> int:
        return self.timer.step


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss,
                  trainer: DictConfig, metrics=("accuracy",), weighted_metrics=None) -> None:
    """`weighted_metrics`: passed on when given (a keras-hub CausalLM otherwise adds its own)."""
    extra = {} if weighted_metrics is None else {"weighted_metrics": list(weighted_metrics)}
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics), **extra,
                  steps_per_execution=trainer.steps_per_execution)


def steps_per_epoch(num_train: int, trainer: DictConfig) -> int:
    """`trainer.steps_per_epoch`, else one pass over the training split (a partial last batch included)."""
    return trainer.steps_per_epoch or -(-num_train // trainer.batch_size)


def epoch_order(num_train: int, trainer: DictConfig, epoch: int) -> np.ndarray:
    """The training examples of `epoch`, in order: a permutation seeded by (trainer.seed, epoch)
    alone, so any step's batch can be recomputed after a restart (see checkpoint.py). With
    `trainer.steps_per_epoch`, exactly that many full batches, reshuffling when the split runs out."""
    rng = np.random.default_rng([trainer.seed, epoch])
    order = rng.permutation(num_train)
    if trainer.steps_per_epoch is None:
        return order
    needed = trainer.steps_per_epoch * trainer.batch_size
    while len(order) < needed:
        order = np.concatenate([order, rng.permutation(num_train)])
    return order[:needed]


class OneTraining(keras.callbacks.CallbackList):
    """One callback list across the per-epoch `fit` calls: callbacks see a single training
    (one on_train_begin, one on_train_end), as with a single `fit`."""

    _open = False

    def on_train_begin(self, logs=None):
        if not self._open:
            self._open = True
            super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        pass

    def finish(self, logs=None):
        super().on_train_end(logs)


def fit_and_evaluate(model: keras.Model, splits: Splits, trainer: DictConfig,
                     callbacks: list[keras.callbacks.Callback], start_step: int = 0,
                     to_inputs=as_they_are) -> TrainResult:
    """Train from optimizer step `start_step` (0, or a checkpoint's) to the end, then evaluate.
    Each epoch is one `fit` call on that epoch's examples in `epoch_order`, skipping the batches
    a resumed epoch already trained on; Keras' own shuffling is off. `to_inputs(x, y)` turns split
    rows into (model inputs, labels) (tasks.batch_inputs)."""
    timer = StepTimer()
    share = distribution.data_share(keras.distribution.distribution())
    verbose = 1 if sys.stdout.isatty() else 2  # a progress bar for people, a line per epoch for logs
    steps = steps_per_epoch(len(splits.y_train), trainer)
    callback_list = OneTraining([timer, *callbacks], add_history=True, add_progbar=True, verbose=verbose,
                                epochs=trainer.epochs, steps=steps, model=model)
    for callback in callback_list.callbacks:
        if isinstance(callback, StepCallback):
            callback.step = start_step
    # Begun here, so that on_train_end always has its begin: also when a run resumed at its last
    # step has no epoch left to train.
    callback_list.on_train_begin()
    first_epoch, done_in_first = divmod(start_step, steps)
    for epoch in range(first_epoch, trainer.epochs):
        order = epoch_order(len(splits.y_train), trainer, epoch)
        if epoch == first_epoch:
            order = order[done_in_first * trainer.batch_size:]
        # This fit's real batch count: the step count caps Keras' end step with it, and the
        # progress bar of a resumed epoch counts what is left.
        callback_list.set_params({**callback_list.params, "steps": -(-len(order) // trainer.batch_size),
                                  "partial_last": len(order) % trainer.batch_size != 0,
                                  "batch_size": trainer.batch_size, "samples": len(order)})
        x, y, batch_size = _fed(share, splits.x_train[order], splits.y_train[order], trainer.batch_size)
        x_val, y_val, _ = _fed(share, splits.x_val, splits.y_val, trainer.batch_size)
        model.fit(
            *to_inputs(x, y),
            validation_data=to_inputs(x_val, y_val),
            batch_size=batch_size,
            validation_batch_size=batch_size,
            initial_epoch=epoch,
            epochs=epoch + 1,
            validation_steps=trainer.eval_steps,
            shuffle=False,
            callbacks=callback_list,
            verbose=verbose,
        )
    callback_list.finish()
    x_test, y_test, batch_size = _fed(share, splits.x_test, splits.y_test, trainer.batch_size)
    test = model.evaluate(*to_inputs(x_test, y_test), batch_size=batch_size,
                          steps=trainer.eval_steps, return_dict=True, verbose=0)
    return TrainResult(
        test={key: float(value) for key, value in test.items()},
        timer=timer,
    )


def validate(model: keras.Model, splits: Splits, trainer: DictConfig, to_inputs=as_they_are) -> dict[str, float]:
    """The validation metrics now, as an epoch's end computes them (`trainer.eval_steps` caps it).
    Between training steps (trainer.eval_every_steps), from a callback's `self.model`, which has
    synced fit's state into the variables: evaluation resets and fills the metric variables that
    fit reads its state back from, so their training values are put back afterwards."""
    running = [keras.ops.convert_to_numpy(variable) for variable in model.metrics_variables]
    x_val, y_val, batch_size = _fed(distribution.data_share(keras.distribution.distribution()),
                                    splits.x_val, splits.y_val, trainer.batch_size)
    values = model.evaluate(*to_inputs(x_val, y_val), batch_size=batch_size,
                            steps=trainer.eval_steps, return_dict=True, verbose=0)
    for variable, value in zip(model.metrics_variables, running):
        variable.assign(value)
    return {key: float(value) for key, value in values.items()}


def perf_metrics(result: TrainResult, batch_size: int, sequence_length: int,
                 disturbed_steps=()) -> dict[str, float]:
    """`perf/` metrics: medians are robust to the odd slow step a shared CPU produces.
    `disturbed_steps`: steps at which a callback read the model state."""
    times = result.timer.step_times(disturbed_steps)
    metrics = {"perf/peak_rss_mb": peak_rss_mb()}
    if result.timer.calls:
        metrics["perf/compile_s"] = result.timer.compile_seconds
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
