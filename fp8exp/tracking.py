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

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

import keras
from omegaconf import DictConfig, OmegaConf

from fp8exp import redact
from fp8exp.config import ConfigError, artifact_root, offline_uri, tracking_uri

log = logging.getLogger(__name__)

BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call
PARAM_LIMIT = 100  # ... and at most 100 params
# While a run is open, a failed HTTP call returns at once (and is queued) instead of retrying with
# backoff for minutes; set these variables yourself to override.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# MLflow error codes that mean "this call is wrong", not "the store is away": not retried.
CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                 "INVALID_STATE", "BAD_REQUEST"}
KILLED_RETRY_S = 5.0  # after SIGTERM the scheduler's grace period is short


def metric_key(keras_key: str) -> str:
    """Keras epoch-log keys -> the prefixes the MLflow UI groups charts by: `val_loss` -> `val/loss`."""
    return "val/" + keras_key[len("val_"):] if keras_key.startswith("val_") else "train/" + keras_key


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys with YAML-like values, as MLflow params."""
    if isinstance(config, dict):
        flat = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: "null" if config is None else str(config)}


def is_outage(error: Exception) -> bool:
    """A failure worth retrying later: the store is unreachable, overloaded or locked."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code not in CLIENT_ERRORS
    import requests

    return isinstance(error, (OSError, requests.RequestException))


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def local_path(uri: str | None) -> Path | None:
    """The directory a file:// (or plain path) artifact URI names; None for remote ones."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if not parsed.scheme else None


@contextlib.contextmanager
def fast_failing_http() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in HTTP_SETTINGS}
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass


@dataclass
class Journal:
    """Everything a run logged in this process, to write a complete copy if the server is lost."""

    experiment: str
    run_name: str
    start_time: int
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """artifact dir -> local file logged into it (the latest)."""


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
        self._queue: list[tuple[str, Callable[[], None]]] = []
        self._in_outage = False
        self.failed_calls = 0

    # -- what training logs ---------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._metrics.extend(entries)
        self.journal.metrics.extend(entries)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        params = redact.flat(params)
        self.journal.params.update(params)
        entries = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(entries), PARAM_LIMIT):
            batch = entries[start:start + PARAM_LIMIT]
            self._queue.append(("params", lambda batch=batch: self.client.log_batch(self.run_id, params=batch)))
        self._deliver()

    def log_text(self, text: str, artifact_file: str) -> None:
        text = redact.text(text)
        self.journal.texts[artifact_file] = text
        self._enqueue(f"text:{artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_artifact(self, path: Path, artifact_dir: str) -> None:
        """Upload the file at `path` (its content when the upload happens: the latest)."""
        self.journal.files[artifact_dir] = str(path)
        self._enqueue(f"file:{artifact_dir}/{Path(path).name}",
                      lambda: self.client.log_artifact(self.run_id, str(path), artifact_dir))

    def log_artifacts(self, directory: Path, artifact_dir: str) -> None:
        """Upload a directory's files (as they are when the upload happens: keep it until the run closes)."""
        self.journal.files[f"{artifact_dir}/"] = str(directory)
        self._enqueue(f"dir:{artifact_dir}", lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_dir))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = redact.tags(tags)
        self.journal.tags.update(tags)
        entries = [RunTag(k, v) for k, v in tags.items()]
        self._queue.append(("tags", lambda: self.client.log_batch(self.run_id, tags=entries)))
        self._deliver()

    def local_artifact_dir(self) -> Path | None:
        return local_path(self.artifact_uri)

    def flush(self) -> None:
        while self._metrics:
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
    def pending(self) -> int:
        return len(self._queue) + (1 if self._metrics else 0)

    def _deliver(self) -> bool:
        """Send queued calls in order until one fails for an outage; True when all went."""
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

    def close(self, status: str, retry_s: float, cfg: DictConfig) -> None:
        """End the run `status`: deliver everything (retrying up to `retry_s`), else write the
        whole run to the offline store. Says which in `delivery_note`."""
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
        from fp8exp.tracking_sync import write_offline

        target = offline_uri(cfg)
        offline_id = write_offline(self.journal, status, end_time, target, remote_uri=self.uri,
                                   remote_run_id=self.run_id)
        self.delivery_note = (
            f"Tracking store {self.uri} stayed unreachable: {len(self._queue)} queued calls of run {self.run_id} "
            f"could not be delivered. Nothing is lost: the run is in {target} (run {offline_id}). Deliver it "
            f"when the server is back: python -m fp8exp.tracking_sync --from {target}")


def check_reachable(cfg: DictConfig, timeout_s: float = 5.0) -> bool:
    """A remote store that cannot be reached fails now, in one line, not after minutes of
    MLflow's retries and a trained model with nowhere to go; with tracking.required=false it
    returns False instead (the run is logged offline)."""
    uri = tracking_uri(cfg)
    if cfg.tracking.name == "none" or not is_remote(uri):
        return True
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        return True
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        shown = redact.text(uri)
        if not cfg.tracking.get("required", True):
            log.warning("Cannot reach the MLflow server at %s (%s); tracking.required=false: logging to %s",
                        shown, reason, offline_uri(cfg))
            return False
        raise ConfigError("tracking.uri", f"cannot reach the MLflow server at {shown} ({reason}); "
                          "start it, fix the address, use tracking.required=false to log offline, "
                          "or tracking=none") from None


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """Get or create; a concurrent job creating it first is not an error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    return experiment.experiment_id


def _artifact_location(cfg: DictConfig, uri: str) -> str | None:
    """Local stores keep artifacts beside the database; a server decides for itself."""
    if cfg.tracking.artifact_root or not uri.startswith(("http://", "https://")):
        return Path(artifact_root(cfg)).resolve().as_uri()
    return None


def offline_artifact_root(uri: str) -> str | None:
    """Artifacts of the offline SQLite store live beside it."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts-offline").as_uri()
    return None


def start_run(cfg: DictConfig, run_name: str, tags: dict[str, str], uri: str | None = None):
    """Create the store, the experiment if missing, and a RUNNING run; returns (client, run id).
    A sweep's parent (`mlflow.parentRunId` in a child's tags) is made here too. Tags and the
    name are masked (credentials on the command line stay out of the store)."""
    client, run = _create_run(cfg, run_name, tags, uri)
    return client, run.info.run_id


def _create_run(cfg: DictConfig, run_name: str, tags: dict[str, str], uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    location = offline_artifact_root(uri) if uri != tracking_uri(cfg) else _artifact_location(cfg, uri)
    experiment_id = ensure_experiment(client, cfg.tracking.experiment, location)
    run = client.create_run(experiment_id, run_name=redact.text(run_name), tags=redact.tags(tags))
    return client, run


@contextlib.contextmanager
def open_run(cfg: DictConfig, run_name: str, tags: dict[str, str], resume_run_id: str | None = None,
             offline: bool = False, checkpoint_root: str | None = None,
             shield: Callable[[], Any] = contextlib.nullcontext) -> Iterator[NullRun]:
    """Yields a run with the config logged; ends it FINISHED, KILLED on interrupt, else FAILED,
    with the reason as tags (`killed.*`, `failure.*`). `resume_run_id` continues that run
    (RUNNING again; its params are already there). `offline`: the server was unreachable at start
    and tracking.required=false, so the run goes to the offline store, marked for delivery.
    `shield`: a context in which closing the run (retries, the offline copy) is not cut short
    by the first stop signal."""
    if cfg.tracking.name == "none":
        yield NullRun(checkpoint_root)
        return

    with fast_failing_http():
        run = _open(cfg, run_name, tags, resume_run_id, offline)
        status = "FAILED"
        try:
            if resume_run_id is None:
                resolved = OmegaConf.to_container(cfg, resolve=True)
                run.log_params(flatten(resolved))
                run.log_text(OmegaConf.to_yaml(redact.container(resolved)), "config.yaml")
            yield run
            status = "FINISHED"
        except KeyboardInterrupt as error:
            status = "KILLED"
            _tag_quietly(run, getattr(error, "tags", None) or {"killed.signal": "SIGINT"})
            raise
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            _tag_quietly(run, {"failure.error": f"{type(error).__name__}: {first_line}"[:1000],
                               **getattr(error, "tags", {})})
            raise
        finally:
            with shield():
                run.close(status, cfg.tracking.retry_s if status != "KILLED" else min(cfg.tracking.retry_s, KILLED_RETRY_S), cfg)
            if offline:
                run.delivery_note = (f"The tracking server {tracking_uri(cfg)} was unreachable at start "
                                     f"(tracking.required=false): run {run.run_id} was logged to {run.uri}. "
                                     f"Deliver it when the server is up: python -m fp8exp.tracking_sync --from {run.uri}")
            if run.delivery_note:
                log.warning(run.delivery_note)


def _open(cfg: DictConfig, run_name: str, tags: dict[str, str], resume_run_id: str | None, offline: bool) -> MlflowRun:
    from mlflow.tracking import MlflowClient

    if resume_run_id is not None:
        uri = tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        previous = client.get_run(resume_run_id)
        client.update_run(resume_run_id, "RUNNING")
        # How the last attempt ended moves into resume.history: a finished run has no killed.* tags.
        ended = {k: v for k, v in previous.data.tags.items() if k.startswith(("killed.", "failure."))}
        for key in ended:
            client.delete_tag(resume_run_id, key)
        count = int(previous.data.tags.get("resume.count", "0")) + 1
        history = previous.data.tags.get("resume.history", "")
        attempt = f"#{count}: {previous.info.status} " + " ".join(f"{k}={v}" for k, v in sorted(ended.items()))
        info = previous.info
        journal = Journal(cfg.tracking.experiment, info.run_name, info.start_time)
        run = MlflowRun(client, resume_run_id, uri, journal, info.artifact_uri)
        run.set_tags({**tags, "resume.count": str(count),
                      "resume.history": (f"{history}; {attempt}" if history else attempt)[-5000:]})
        return run
    uri = offline_uri(cfg) if offline else tracking_uri(cfg)
    if offline:
        tags = {**tags, "fp8exp.sync.status": "pending", "fp8exp.sync.target_uri": tracking_uri(cfg)}
    client, created = _create_run(cfg, run_name, tags, uri)
    journal = Journal(cfg.tracking.experiment, created.info.run_name, created.info.start_time,
                      tags=dict(created.data.tags))
    return MlflowRun(client, created.info.run_id, uri, journal, created.info.artifact_uri)


def _tag_quietly(run: MlflowRun, tags: dict[str, str]) -> None:
    """Tags on the way out must not hide the error that ended the run."""
    try:
        run.set_tags(tags)
    except Exception as error:  # noqa: BLE001
        log.warning("could not tag run %s: %s", run.run_id, error)


class EpochLogger(keras.callbacks.Callback):
    """`train/*` and `val/*` metrics at the end of every epoch (step = epoch number, from 1)."""

    def __init__(self, run: NullRun):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        self.run.log_metrics({metric_key(k): v for k, v in (logs or {}).items()}, step=epoch + 1)
        self.run.flush()


def ui_command(cfg: DictConfig) -> str:
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1   (or: make ui)"
