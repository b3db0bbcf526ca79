"""MLflow tracking: one run per experiment, opened around training and always closed with an
honest status. It only observes: callbacks and the experiment hand it numbers; it never
reaches back into data or model construction. `tracking=none` swaps in a run that keeps nothing.

Nothing a run logs is lost to a tracking server that goes away: calls fail fast (no minutes of
MLflow's HTTP retries stalling training), stay queued in order and are retried at the next flush;
at the end of the run the queue is retried for `tracking.retry_s`, and whatever still cannot be
delivered is written, with the rest of the run, to a local store (`tracking.offline_uri`) that
`python -m fp8exp.tracking_sync` delivers later. Credentials never reach params, tags or text
artifacts (see redact.py)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from fp8exp.config import offline_uri
from fp8exp.tracking import redact
from fp8exp.tracking.offline import Journal, write_offline
from fp8exp.tracking.store import is_outage, local_path

log = logging.getLogger(__name__)

BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call
PARAM_LIMIT = 100  # ... and at most 100 params
KILLED_RETRY_S = 5.0  # after SIGTERM the scheduler's grace period is short


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys with YAML-like values, as MLflow params."""
    if isinstance(config, dict):
        flat = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: "null" if config is None else str(config)}


def _serialized(method):
    """The journal and the queue change under the run's lock: end_now may be closing the run from
    another thread (and then writing the journal out)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._store_lock:
            return method(self, *args, **kwargs)
    return locked


class NullRun:
    """`tracking=none`: the run interface, keeping nothing (but checkpoints, in `checkpoint_root`:
    the Hydra output dir, when there is one)."""

    run_id = None
    delivery_note = ""

    def __init__(self, checkpoint_root: str | None = None):
        self.checkpoint_root = checkpoint_root

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def local_artifact_dir(self) -> Path | None:
        return Path(self.checkpoint_root) if self.checkpoint_root else None

    def log_artifact(self, path: Path, artifact_dir: str) -> None:
        pass

    def log_artifacts(self, directory: Path, artifact_dir: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_inputs(self, datasets: list) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def end_now(self, status: str, tags: dict[str, str], cfg: DictConfig) -> None:
        pass

    @property
    def in_outage(self) -> bool:
        """Whether the store is unreachable right now (calls are queued)."""
        return False


class MlflowRun(NullRun):
    """Buffers metrics and sends them in batches: one round trip per epoch or log point, not one
    per value. Every call to the store goes through one ordered queue: one that fails because the
    store is away stays queued (with all after it) and is retried at the next flush or call."""

    def __init__(self, client, run_id: str, uri: str, journal: Journal, artifact_uri: str | None = None):
        super().__init__()
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.journal = journal
        self.artifact_uri = artifact_uri
        self._metrics: list = []
        self._metrics_lock = threading.Lock()  # the system-metrics thread logs too (system.py)
        self._queue: list[tuple[str, Callable[[], None]]] = []
        self._in_outage = False
        self.failed_calls = 0
        self._store_lock = threading.RLock()  # end_now closes from another thread
        self._closed = False

    # -- what training logs ---------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        with self._metrics_lock:
            self._metrics.extend(entries)
            self.journal.metrics.extend(entries)

    @_serialized
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        params = redact.flat(params)
        self.journal.params.update(params)
        entries = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(entries), PARAM_LIMIT):
            batch = entries[start:start + PARAM_LIMIT]
            self._queue.append(("params", lambda batch=batch: self.client.log_batch(self.run_id, params=batch)))
        self._deliver()

    @_serialized
    def log_text(self, text: str, artifact_file: str) -> None:
        text = redact.text(text)
        self.journal.texts[artifact_file] = text
        self._enqueue(f"text:{artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    @_serialized
    def log_inputs(self, datasets: list) -> None:
        """MLflow DatasetInputs (datasets.dataset_inputs): the Dataset column of the UI."""
        self.journal.inputs.extend(datasets)

        def log_inputs():  # best effort: a store that refuses them (an older server) still gets the run
            try:
                self.client.log_inputs(self.run_id, datasets=datasets)
            except Exception as error:
                if is_outage(error):
                    raise
                log.warning("Tracking store %s refused the run's dataset inputs (%s); the run goes on without them",
                            self.uri, str(error).splitlines()[0][:200])

        self._queue.append(("inputs", log_inputs))
        self._deliver()

    @_serialized
    def log_artifact(self, path: Path, artifact_dir: str) -> None:
        """Upload the file at `path` (its content when the upload happens: the latest)."""
        self.journal.files[artifact_dir] = str(path)
        self._enqueue(f"file:{artifact_dir}/{Path(path).name}",
                      lambda: self.client.log_artifact(self.run_id, str(path), artifact_dir))

    @_serialized
    def log_artifacts(self, directory: Path, artifact_dir: str) -> None:
        """Upload a directory's files (as they are when the upload happens: keep it until the run closes)."""
        self.keep_for_offline(directory, artifact_dir)
        self._enqueue(f"dir:{artifact_dir}", lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_dir))

    @_serialized
    def keep_for_offline(self, directory: Path, artifact_dir: str) -> None:
        """Files delivered some other way (a LoggedModel's), in the journal for an offline copy."""
        self.journal.files[f"{artifact_dir}/"] = str(directory)

    @_serialized
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = redact.tags(tags)
        self.journal.tags.update(tags)
        entries = [RunTag(k, v) for k, v in tags.items()]
        self._queue.append(("tags", lambda: self.client.log_batch(self.run_id, tags=entries)))
        self._deliver()

    def local_artifact_dir(self) -> Path | None:
        return local_path(self.artifact_uri)

    @_serialized
    def call(self, key: str, call: Callable[[], Any]) -> None:
        """Any other store call (a LoggedModel's, say) through the ordered queue: sent after what
        is queued before it, kept and retried while the store is away. Not in the journal: the
        offline copy holds only what the journal describes."""
        self._enqueue(key, call)

    def end_now(self, status: str, tags: dict[str, str], cfg: DictConfig) -> None:
        """From another thread, while the one training may be stuck (in a collective whose peer
        process died) and the process is about to exit: `tags`, everything queued and `status`
        delivered, else the whole run written to the offline store, as close() does. A run
        already closed is left as it is."""
        with self._store_lock:
            if self._closed:
                return
            try:
                self.set_tags(tags)
            except Exception as error:  # noqa: BLE001  (rejected: the status must still go)
                log.error("could not tag run %s: %s", self.run_id, error)
            try:
                self.close(status, cfg)
            except Exception as error:  # noqa: BLE001  (the process exits next, whatever happens)
                log.error("could not end run %s %s: %s", self.run_id, status, error)
        if self.delivery_note:
            log.warning(self.delivery_note)

    @_serialized
    def flush(self) -> None:
        while self._metrics:
            with self._metrics_lock:
                batch, self._metrics = self._metrics[:BATCH_LIMIT], self._metrics[BATCH_LIMIT:]
            self._queue.append(("metrics", lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch)))
        self._deliver()

    # -- delivery -------------------------------------------------------------------------
    def _enqueue(self, key: str, call: Callable[[], None]) -> None:
        """Queue a call that replaces a still-queued one with the same key (a re-logged file)."""
        self._queue = [entry for entry in self._queue if entry[0] != key]
        self._queue.append((key, call))
        self._deliver()

    @property
    def in_outage(self) -> bool:
        return self._in_outage

    def _deliver(self) -> bool:
        """Send queued calls in order until one fails for an outage; True when all went. Once
        the run is closed, nothing more goes: a closed run is never changed. Under the lock."""
        if self._closed:
            return True
        while self._queue:
            try:
                self._queue[0][1]()
            except Exception as error:
                if not is_outage(error):
                    self._queue.pop(0)
                    raise
                self.failed_calls += 1
                if not self._in_outage:
                    self._in_outage = True
                    log.warning("Tracking store %s unreachable (%s); keeping this run's data and retrying",
                                self.uri, str(error).splitlines()[0][:200])
                return False
            self._queue.pop(0)
        if self._in_outage:
            self._in_outage = False
            log.warning("Tracking store %s is back; everything buffered was delivered", self.uri)
        return True

    def close(self, status: str, cfg: DictConfig, retry_s: float | None = None) -> None:
        """End the run `status`: deliver everything (retrying tracking.retry_s, KILLED at most
        KILLED_RETRY_S), else write the whole run offline. Says which in `delivery_note`. Once only."""
        if retry_s is None:
            retry_s = min(cfg.tracking.retry_s, KILLED_RETRY_S) if status == "KILLED" else cfg.tracking.retry_s
        with self._store_lock:
            if not self._closed:
                try:
                    self._close(status, retry_s, cfg)
                finally:
                    self._closed = True

    def _close(self, status: str, retry_s: float, cfg: DictConfig) -> None:
        self.flush()
        end_time = int(time.time() * 1000)
        self._queue.append(("status", lambda: self.client.set_terminated(self.run_id, status, end_time)))
        deadline, delay = time.monotonic() + retry_s, 0.5
        while True:
            try:
                if self._deliver() or time.monotonic() >= deadline:
                    break
            except Exception as error:  # noqa: BLE001  (a rejected call is dropped; the rest still go)
                log.error("MLflow rejected a call for run %s: %s", self.run_id, error)
                continue
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 5.0)
        if not self._queue:
            if self.failed_calls:
                self.delivery_note = (f"Tracking store {self.uri} was unreachable for part of the run "
                                      f"({self.failed_calls} failed calls); everything was delivered once it came back.")
            return
        target = offline_uri(cfg)
        offline_id = write_offline(self.journal, status, end_time, target, remote_uri=self.uri,
                                   remote_run_id=self.run_id)
        self.delivery_note = (
            f"Tracking store {self.uri} stayed unreachable: {len(self._queue)} queued calls of run {self.run_id} "
            f"could not be delivered. Nothing is lost: the run is in {target} (run {offline_id}). Deliver it "
            f"when the server is back: python -m fp8exp.tracking_sync --from {target}")
