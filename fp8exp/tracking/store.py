"""The MLflow store: whether a server is reachable, where artifacts go, experiments, and the
creation of runs. Every call made while a run is open fails fast instead of retrying for minutes."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from omegaconf import DictConfig

from fp8exp.config import ConfigError, artifact_root, offline_uri, tracking_uri
from fp8exp.tracking import redact

log = logging.getLogger(__name__)

# While a run is open, a failed HTTP call returns at once (and is queued) instead of retrying with
# backoff for minutes; set these variables yourself to override.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


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


# The experiment's kind as the MLflow UI's own experiment-type selector stores it: model training
# ("Machine learning"), not GenAI. MLflow 3.17's UI reads it only with its workflow toggle turned off;
# as shipped it opens experiments in the view the GenAI / Model training toggle picks (kept in the
# browser, default GenAI; `?workflowType=machine_learning` in the URL picks Model training).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """Get or create (marked a model-training experiment, EXPERIMENT_KIND_TAG, also when an
    existing one has no kind yet); a concurrent job creating it first is not an error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind someone chose stays
        try:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except MlflowException as error:  # a read-only experiment, say: the runs matter more
            log.warning("Could not mark experiment %r as model training: %s", name, error)
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


def create_run(cfg: DictConfig, run_name: str, tags: dict[str, str], uri: str | None = None):
    """Create the store, the experiment if missing, and a RUNNING run; returns (client, run).
    A sweep's parent (`mlflow.parentRunId` in a child's tags) is made here too. Tags and the
    name are masked (credentials on the command line stay out of the store)."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    location = offline_artifact_root(uri) if uri != tracking_uri(cfg) else _artifact_location(cfg, uri)
    experiment_id = ensure_experiment(client, cfg.tracking.experiment, location)
    run = client.create_run(experiment_id, run_name=redact.text(run_name), tags=redact.tags(tags))
    return client, run


def ui_command(cfg: DictConfig) -> str:
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1   (or: make ui)"


# MLflow error codes that mean "this call is wrong", not "the store is away": not retried.
CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                 "INVALID_STATE", "BAD_REQUEST", "ENDPOINT_NOT_FOUND"}


def is_outage(error: Exception) -> bool:
    """A failure worth retrying later: the store is unreachable, overloaded or locked."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code not in CLIENT_ERRORS
    import requests

    return isinstance(error, (OSError, requests.RequestException))
