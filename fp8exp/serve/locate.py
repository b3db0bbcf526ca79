"""Where a run's (or a LoggedModel's) saved model is on this machine, and whether its files can
be used, checked before Keras loads (and TensorFlow starts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fp8exp.serve.settings import UsageError, store_uri


@dataclass
class Located:
    directory: Path
    """The MLflow model directory on this machine."""
    name: str
    """The model, for messages."""
    run_id: str | None
    model_id: str | None
    """The LoggedModel's id; None for a run's plain artifact `model/`."""


def locate(run_id: str | None, tracking_uri: str | None, scratch: Path, model_id: str | None = None) -> Located:
    """The saved model of run `run_id` or the LoggedModel `model_id`, on this machine (downloaded
    into `scratch` unless the artifact store is local). A run's model is its newest READY LoggedModel
    named `model`, else its plain artifact `model/`. Needs MLflow only."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = store_uri(tracking_uri)
    client = MlflowClient(uri)
    if model_id:
        try:
            model = client.get_logged_model(model_id)
        except MlflowException:
            raise UsageError(f"no model {model_id!r} in the store at {uri}") from None
        name = f"model {model_id} ({model.name}, {model.status}, of run {model.source_run_id})"
        if str(model.status) == "FAILED":
            raise UsageError(f"{name} failed while it was saved; use its run's model or train again")
        return Located(_logged_model_files(client, model, scratch, name), name, model.source_run_id, model_id)

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"no run {run_id!r} in the store at {uri}") from None
    name = f"run {run_id} ({run.info.run_name}, {run.info.status})"
    model = run_model(client, run)
    if model is not None:
        return Located(_logged_model_files(client, model, scratch, name), f"{name}, model {model.model_id}",
                       run_id, model.model_id)
    return Located(_artifact_files(client, run, scratch, name), name, run_id, None)


def run_model(client, run):
    """The run's newest READY LoggedModel named `model`, or None (a plain artifact, no model)."""
    from fp8exp.serve import textmodel as serving

    models = client.search_logged_models(  # (a filter on status finds nothing in MLflow 3.17's SQL store)
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{serving.ARTIFACT_PATH}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    return next((model for model in models if str(model.status) == "READY"), None)


def _logged_model_files(client, model, scratch: Path, name: str) -> Path:
    import mlflow.artifacts

    from fp8exp.tracking.store import local_path

    files = {artifact.path for artifact in client.list_logged_model_artifacts(model.model_id)}
    if "artifacts" not in files or "MLmodel" not in files:
        raise UsageError(f"{name} has no files (status {model.status}): its upload did not complete; "
                         "use its run's model (run_id=) or train again")
    local = local_path(model.artifact_location)
    if local is not None and local.is_dir():
        return local
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(scratch),
                                                   tracking_uri=client.tracking_uri))


def _artifact_files(client, run, scratch: Path, name: str) -> Path:
    """A run's plain artifact `model/` (runs saved offline or by fp8exp before LoggedModels)."""
    import mlflow.artifacts

    from fp8exp.serve import textmodel as serving
    from fp8exp.tracking.store import local_path

    where = f"{run.info.artifact_uri.rstrip('/')}/{serving.ARTIFACT_PATH}"
    try:
        saved = {artifact.path for artifact in mlflow.artifacts.list_artifacts(artifact_uri=where,
                                                                              tracking_uri=client.tracking_uri)}
    except Exception:  # noqa: BLE001  (stores differ in what they raise for a missing folder)
        saved = set()
    if "artifacts" not in {path.rstrip("/").rsplit("/", 1)[-1] for path in saved}:
        why = "it ended before saving" if run.info.status != "FINISHED" else \
            "it ran with tracking.save_model=false or before fp8exp saved models"
        raise UsageError(f"{name} has no saved model ({why}); train again with tracking.save_model=true")
    local = local_path(run.info.artifact_uri)
    if local is not None and (local / serving.ARTIFACT_PATH).is_dir():
        return local / serving.ARTIFACT_PATH
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(scratch),
                                                   tracking_uri=client.tracking_uri))


def model_dir(run_id: str | None, tracking_uri: str | None, scratch: Path,
              model_id: str | None = None) -> tuple[Path, str]:
    """(the model directory, a description for messages): see locate."""
    located = locate(run_id, tracking_uri, scratch, model_id)
    return located.directory, located.name


def check_files(directory: Path, name: str) -> dict:
    """Metadata and the model file's outline, before Keras loads (and TensorFlow starts)."""
    import zipfile

    from fp8exp.serve import textmodel as serving

    files = directory / "artifacts"
    try:
        meta = serving.read_meta(files / serving.META_FILE)
    except serving.ModelFileError as error:
        raise UsageError(f"{name}: {error}".replace(str(directory), "model")) from None
    keras_file = files / serving.KERAS_FILE
    try:
        with zipfile.ZipFile(keras_file) as archive:
            members = set(archive.namelist())
            damaged = archive.testzip()
    except FileNotFoundError:
        raise UsageError(f"{name}: model/artifacts/{serving.KERAS_FILE} is missing") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise UsageError(f"{name}: model/artifacts/{serving.KERAS_FILE} is corrupt ({error})") from None
    if damaged or not {"config.json", "model.weights.h5"} <= members:
        raise UsageError(f"{name}: model/artifacts/{serving.KERAS_FILE} is corrupt "
                         f"({'bad CRC in ' + damaged if damaged else 'not a Keras model file'})")
    return meta


def load(run_id: str | None, tracking_uri: str | None, scratch: Path, model_id: str | None = None):
    """(TextClassifier or TextGenerator, model description); UsageError for anything a user can fix."""
    directory, name = model_dir(run_id, tracking_uri, scratch, model_id)
    check_files(directory, name)
    return load_directory(directory, name), name


def load_directory(directory: Path, name: str):
    """The saved model in `directory` (checked by check_files), with fp8exp's own pooling layer (a
    family classifier's config names it) and recipe layers registered, as the pyfunc model imports
    its shipped copies."""
    import fp8exp  # noqa: F401  (the Keras backend)
    from fp8exp.models import pooling  # noqa: F401  (registers fp8exp>SequencePooling)
    from fp8exp.precision.recipes import layers  # noqa: F401  (registers fp8exp>RecipeDense, RecipeEinsumDense)
    from fp8exp.serve import textmodel as serving

    try:
        return serving.load(directory)
    except serving.ModelFileError as error:
        raise UsageError(f"{name}: {error}".replace(str(directory), "model")) from None
