"""How a run stops early, and says why: a signal (SIGINT, SIGTERM, or SIGUSR2, which SLURM and
submitit send before preemption) finishes the current step and leaves a checkpoint; a non-finite
loss or FP8 scale stops training naming the step and the layers. Both end the MLflow run with tags
that say what happened (KILLED and FAILED respectively)."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from typing import Callable, Iterator

import keras

from fp8exp.precision.scales import non_finite_state
from fp8exp.tracking.callbacks import StepCallback

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the run. A KeyboardInterrupt, so the run ends KILLED and a sweep stops;
    the process exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint_step: int | None = None):
        super().__init__(f"signal {signum}")
        self.signum = signum
        self.step = step
        self.checkpoint_step = checkpoint_step
        self.run_id: str | None = None
        self.resume_hint = ""

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def tags(self) -> dict[str, str]:
        tags = {"killed.signal": self.signal_name}
        if self.step is not None:
            tags["killed.step"] = str(self.step)
        return tags

    def __str__(self) -> str:
        where = f" after step {self.step}" if self.step is not None else " outside training"
        if self.checkpoint_step is not None:
            saved = f"; checkpoint of step {self.checkpoint_step} saved in MLflow run {self.run_id or '(none)'}"
        else:
            saved = "; no checkpoint written"
        return f"interrupted by {self.signal_name}{where}{saved}{self.resume_hint}"


class NumericalFault(RuntimeError):
    """Training produced a NaN or Inf. `tags` land on the FAILED run."""

    def __init__(self, step: int, what: str, fp8_tensors: list[str], last_checkpoint: int | None):
        self.step = step
        self.what = what
        self.fp8_tensors = fp8_tensors
        self.last_checkpoint = last_checkpoint
        fp8 = f"; non-finite FP8 state in {', '.join(fp8_tensors)}" if fp8_tensors else ""
        kept = (f"the last good checkpoint (step {last_checkpoint}) is kept in the run" if last_checkpoint
                else "no checkpoint was written before it")
        super().__init__(f"non-finite {what} at step {step}{fp8}; {kept}. Lower trainer.learning_rate "
                         f"or change the precision")

    @property
    def tags(self) -> dict[str, str]:
        tags = {"failure.reason": "non_finite", "failure.step": str(self.step), "failure.non_finite": self.what}
        if self.fp8_tensors:
            tags["failure.non_finite_fp8"] = ", ".join(self.fp8_tensors)[:5000]
        if self.last_checkpoint:
            tags["failure.last_good_checkpoint"] = str(self.last_checkpoint)
        return tags


class GracefulStop:
    """Stop signals during training only set a flag: the Checkpointer finishes the step, saves
    and raises Interrupted. Outside training (data loading, evaluation), or on a second signal,
    Interrupted is raised at once. Handlers are restored on exit, and a handler someone else had
    installed for the signal received (submitit's SIGUSR2 checkpoint-and-requeue, a sweep's
    SIGTERM handler) is then called too, once the run is checkpointed and closed."""

    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.deferring and self.signum is None:
            self.signum = signum
            log.warning("%s received: finishing the current step, then writing a checkpoint (send it "
                        "again to stop at once)", signal.Signals(signum).name)
            return
        self.signum = self.signum or signum
        raise Interrupted(signum)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        previous = dict(self._previous)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        chained = previous.get(self.signum) if self.signum is not None else None
        if callable(chained) and chained is not signal.default_int_handler:
            try:
                chained(self.signum, None)
            except KeyboardInterrupt:
                pass  # that handler stops the process too: already under way

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While training: a signal stops training at the next step boundary, not mid-step."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


def non_finite_fp8(model: keras.Model) -> list[str]:
    """`<layer>/<tensor>_scale` or `_amax_history` variables (recipe layers: `_scale_stats` records)
    holding a NaN or Inf."""
    return non_finite_state(model)


class NonFiniteGuard(StepCallback):
    """Stops training at the first non-finite loss. The loss in `logs` is already a Python float
    (no extra device sync); the model is read only once a fault is found, to name the FP8
    tensors that went bad. `check_fp8_metrics` does the same for FP8 scales at FP8 log points.
    mixed_float16's LossScaleOptimizer skips steps whose gradients overflow, which leaves the
    loss finite: those steps are not faults."""

    def __init__(self, last_checkpoint: Callable[[], int | None] = lambda: None):
        super().__init__()
        self.last_checkpoint = last_checkpoint

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.fail(f"loss ({loss})")

    def check_fp8_metrics(self, metrics: dict[str, float], step: int) -> None:
        bad = [key for key, value in metrics.items()
               if key.endswith(("_scale", "_amax", "_scale_min", "_scale_max", "_scale_median"))
               and not math.isfinite(value)]
        if bad:
            self.step = step  # the FP8 logger runs before this callback's own step count
            self.fail("FP8 scale or amax")

    def fail(self, what: str) -> None:
        fp8 = non_finite_fp8(self.model)
        raise NumericalFault(self.step, what, fp8, self.last_checkpoint())
