"""Checkpoints that let an interrupted run continue exactly where it stopped.

What is saved: every model variable (weights, the FP8 scales and amax histories, the dropout seed
generators' states), the optimizer's variables (Adam moments, iteration count, a loss scale), the
running training metrics of a part-done epoch, the global NumPy and Python RNG states, and the
position: the optimizer step. The data order is a pure function of (trainer.seed, epoch)
(train.epoch_order), so the step alone says which batch comes next.

Where: in the MLflow run's artifacts, `checkpoints/last.npz`, so `trainer.resume_from=RUN_ID`
finds it from any machine that reaches the store, and the run itself records what it can be
resumed from (tags `checkpoint.step`, `checkpoint.epoch`). With a local artifact store the file is
written in place; with a server it is written to a local staging file and uploaded (retried
like any other tracking call while the server is away). Either way one .npz holds arrays and
metadata together, written to `<name>.partial`, fsynced, then renamed over the previous one: a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import keras
import numpy as np

from fp8exp.precision.readback import on_host
from fp8exp.run.stopping import Interrupted
from fp8exp.tracking.callbacks import StepCallback

log = logging.getLogger(__name__)

ARTIFACT_DIR = "checkpoints"
FILE_NAME = "last.npz"
ARTIFACT = f"{ARTIFACT_DIR}/{FILE_NAME}"
FORMAT = 1
META = "__meta__"


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainingState:
    arrays: dict[str, np.ndarray]
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def group(self, name: str) -> list[np.ndarray]:
        return [self.arrays[f"{name}/{i:05d}"] for i in range(len(self.meta["paths"][name]))]


def _variables(model: keras.Model) -> dict[str, list]:
    return {"trainable": model.trainable_variables, "non_trainable": model.non_trainable_variables,
            "optimizer": model.optimizer.variables, "metrics": model.metrics_variables}


def _plain(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """ml_dtypes arrays (bfloat16, float8) do not survive .npz: store their bits, and the dtype."""
    if array.dtype.kind == "V" or array.dtype.name in ("bfloat16",) or array.dtype.name.startswith("float8"):
        return array.view(np.dtype(f"uint{8 * array.dtype.itemsize}")), array.dtype.name
    return array, None


def capture(model: keras.Model, step: int, steps_per_epoch: int, config_hash: str) -> TrainingState:
    """The whole training state at optimizer step `step`. `model` must be synced (a callback's
    `self.model` is). On processes other than 0 (which write nothing) it holds no variables."""
    arrays, paths, dtypes = {}, {}, {}
    for name, variables in _variables(model).items():
        paths[name] = [v.path for v in variables]
        for index, variable in enumerate(variables):
            key = f"{name}/{index:05d}"
            whole = on_host(variable.value)  # every process takes part in a gather...
            if jax.process_index() > 0:
                continue  # ...and process 0 alone writes: the others keep no copy
            arrays[key], dtype = _plain(whole)
            if dtype:
                dtypes[key] = dtype
    numpy_rng = np.random.get_state()
    arrays["rng/numpy"] = numpy_rng[1]
    epoch, batch = divmod(step, steps_per_epoch)
    meta = {
        "format": FORMAT, "step": step, "epoch": epoch, "batch": batch, "steps_per_epoch": steps_per_epoch,
        "config_hash": config_hash, "paths": paths, "dtypes": dtypes, "saved_at": time.time(),
        "numpy_rng": [numpy_rng[0], *[float(x) if isinstance(x, float) else int(x) for x in numpy_rng[2:]]],
        "python_rng": random.getstate(),
        "versions": {"keras": keras.__version__},
    }
    return TrainingState(arrays, meta)


def _save(handle, state: TrainingState) -> None:
    meta = np.frombuffer(json.dumps(state.meta).encode(), dtype=np.uint8)
    np.savez(handle, **state.arrays, **{META: meta})


def encode(state: TrainingState) -> bytes:
    """The checkpoint file's bytes (process 0 hands them to the other processes at start-up)."""
    buffer = io.BytesIO()
    _save(buffer, state)
    return buffer.getvalue()


def decode(data: bytes) -> TrainingState:
    return read(io.BytesIO(data))


def write(path: Path, state: TrainingState) -> None:
    """Atomically replace `path`: a crash at any point leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        _save(handle, state)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read(path) -> TrainingState:
    """Load and fully verify (zip CRCs) a checkpoint (a path or a file); CheckpointError if it is damaged."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({error})") from None
    if META not in arrays:
        raise CheckpointError(f"checkpoint {path} has no metadata")
    meta = json.loads(bytes(arrays.pop(META)).decode())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}")
    for key, dtype in meta["dtypes"].items():
        import ml_dtypes

        arrays[key] = arrays[key].view(getattr(ml_dtypes, dtype))
    return TrainingState(arrays, meta)


def restore(model: keras.Model, state: TrainingState, metrics: bool) -> None:
    """Assign the saved values (the model must be built, with its optimizer and metrics)."""
    for name, variables in _variables(model).items():
        if name == "metrics" and not metrics:
            continue
        saved = state.group(name)
        if len(saved) != len(variables):
            raise CheckpointError(f"checkpoint has {len(saved)} {name} variables, this model {len(variables)}: "
                                  "was it written by a different model or precision?")
        for variable, value, path in zip(variables, saved, state.meta["paths"][name]):
            if tuple(variable.shape) != value.shape:
                raise CheckpointError(f"checkpoint variable {path} has shape {value.shape}, this model's "
                                      f"{variable.path} {tuple(variable.shape)}")
            variable.assign(value)
    kind, *rest = state.meta["numpy_rng"]
    np.random.set_state((kind, state.arrays["rng/numpy"], *rest))
    version, internal, gauss = state.meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def restore_untrained(model: keras.Model, state: TrainingState) -> None:
    """Restore into a model that will not train in this process (its checkpoint is at the last
    step): Keras builds the optimizer only when training starts, so build it first, giving every
    saved variable a place. The running metrics are not needed: an ended epoch reset them."""
    model.optimizer.build(model.trainable_variables)
    restore(model, state, metrics=False)


class Restore(keras.callbacks.Callback):
    """Puts a checkpoint's state into the model at the first epoch's start: Keras has built the
    optimizer and metrics and reset the metrics by then, and on JAX reads the variables into the
    compiled step's state right after this hook. The running metrics of a part-done epoch are
    restored too, so that epoch's logged averages match an uninterrupted run."""

    def __init__(self, state: TrainingState):
        super().__init__()
        self.state = state
        self.done = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self.done:
            restore(self.model, self.state, metrics=self.state.meta["batch"] > 0)
            self.done = True


class Checkpointer(StepCallback):
    """Saves every `every` steps and when a stop signal was received (then raises Interrupted).
    A save that falls on an epoch's last step waits for the epoch's end, after validation and
    logging, so a checkpoint is always either mid-epoch or at a clean epoch boundary.
    `saved_steps` are reported to the step timer: reading the state there disturbs timing."""

    def __init__(self, every: int | None, steps_per_epoch: int, total_steps: int, stop,
                 save: Callable[[keras.Model, int], bool]):
        super().__init__()
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.stop = stop
        self.save = save
        self.saved_steps: list[int] = []
        self.last_saved: int | None = None
        self._since = 0

    def start_at(self, step: int) -> None:
        self.step = self._since = step

    def _due(self) -> bool:
        return bool(self.every) and self.step // self.every > self._since // self.every

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.step % self.steps_per_epoch == 0:
            return  # the epoch's last step: on_epoch_end decides
        self._end_step(self._due())

    def on_epoch_end(self, epoch, logs=None):
        self._end_step(self._due() and self.step < self.total_steps)

    def on_train_end(self, logs=None):
        self.stop.deferring = False  # evaluation and reporting: a signal stops at once

    def _end_step(self, due: bool) -> None:
        stopping = self._agreed_stop()  # decided once: a signal arriving after is the next step's...
        if stopping or due:
            self._save()
        if jax.process_count() == 1 and self.stop.requested and self.last_saved == self.step:
            stopping = True  # ...except one during this step's save, with nobody else to agree with
        if stopping:
            raise Interrupted(self.stop.signum, self.step, self.last_saved if self.last_saved == self.step else None)

    def _save(self) -> None:
        if self.save(self.model, self.step):
            self.last_saved = self.step
        self.saved_steps.append(self.step)
        self._since = self.step

    def _agreed_stop(self) -> bool:
        """Stop after this step? With several processes, if any of them was signalled before this
        step's gather: all agree, so all stop at the same step and none is left waiting in a
        collective for a stopped one (a signal landing just after the gather waits a step)."""
        signum = self.stop.signum
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            signals = multihost_utils.process_allgather(np.array(signum or 0, np.int32))
            signum = int(np.max(signals)) or None
            if self.stop.signum is None and signum is not None:
                self.stop.signum = signum  # a peer's signal: stop as it does
        return signum is not None


def store(run, state: TrainingState, staging: Path) -> bool:
    """Write `state` as the run's checkpoint; False where the run keeps no files (tracking=none
    outside a Hydra output dir)."""
    local = run.local_artifact_dir()
    if local is not None:
        write(local / ARTIFACT, state)
    elif run.run_id is not None:
        path = staging / FILE_NAME
        write(path, state)
        run.log_artifact(path, ARTIFACT_DIR)
    else:
        return False
    run.set_tags({"checkpoint.step": str(state.step), "checkpoint.epoch": str(state.meta["epoch"]),
                  "checkpoint.batch": str(state.meta["batch"])})
    log.info("Checkpoint of step %d written (%s)", state.step,
             local / ARTIFACT if local is not None else f"{ARTIFACT} of run {run.run_id}")
    return True
