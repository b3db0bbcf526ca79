"""MLflow tracking: one run per experiment, opened around training and always closed with an
honest status. It only observes: callbacks and the experiment hand it numbers; it never
reaches back into data or model construction. `tracking=none` swaps in a run that keeps nothing."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

import keras
from omegaconf import DictConfig, OmegaConf

from fp8exp.config import ConfigError, artifact_root, tracking_uri

# Keras history keys -> the metric prefixes the MLflow UI groups charts by.
SPLIT_PREFIX = {"val_": "val/"}
BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call


def metric_key(keras_key: str, default_prefix: str = "train/") -> str:
    for keras_prefix, prefix in SPLIT_PREFIX.items():
        if keras_key.startswith(keras_prefix):
            return prefix + keras_key[len(keras_prefix):]
    return default_prefix + keras_key


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys with YAML-like values, as MLflow params."""
    if isinstance(config, dict):
        flat = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: "null" if config is None else str(config)}


class NullRun:
    """`tracking=none`: the run interface, keeping nothing."""

    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass


class MlflowRun(NullRun):
    """Buffers metrics and sends them in batches: one round trip per epoch or log point,
    not one per value."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self._pending: list = []

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
            self.client.log_batch(self.run_id, metrics=batch)


def check_reachable(cfg: DictConfig, timeout_s: float = 5.0) -> None:
    """A remote store that cannot be reached fails now, in one line, not after minutes of
    MLflow's retries and a trained model with nowhere to go."""
    uri = tracking_uri(cfg)
    if cfg.tracking.name == "none" or not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError("tracking.uri", f"cannot reach the MLflow server at {uri} ({reason}); "
                          "start it, fix the address, or use tracking=none") from None


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


def start_run(cfg: DictConfig, run_name: str, tags: dict[str, str]):
    """Create the store, the experiment if missing, and a RUNNING run; returns (client, run id).
    A sweep's parent (`mlflow.parentRunId` in a child's tags) is made here too."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(client, cfg.tracking.experiment, _artifact_location(cfg, uri))
    return client, client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


@contextlib.contextmanager
def open_run(cfg: DictConfig, run_name: str, tags: dict[str, str]) -> Iterator[NullRun]:
    """Yields a run with the config logged; ends it FINISHED, KILLED on interrupt, else FAILED."""
    if cfg.tracking.name == "none":
        yield NullRun()
        return

    client, run_id = start_run(cfg, run_name, tags)
    run = MlflowRun(client, run_id)
    status = "FAILED"
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(resolved).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.run_id, params=params[start:start + 100])
        run.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            run.flush()
        finally:
            client.set_terminated(run.run_id, status)


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
