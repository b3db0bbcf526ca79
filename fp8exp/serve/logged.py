"""The MLflow side of a saved model: the run's LoggedModel (created, tagged, given the run's final
metrics) and its versions in the Model Registry. save.py writes the files."""

from __future__ import annotations

import logging

from fp8exp.serve.textmodel.files import ARTIFACT_PATH

log = logging.getLogger(__name__)

MODEL_NAME = ARTIFACT_PATH
MODEL_TYPES = {"classify": "fp8exp-text-classifier", "causal_lm": "fp8exp-language-model"}
MODEL_METRICS = ("test/", "perf/step_time_ms", "perf/examples_per_s", "perf/tokens_per_s")


def model_tags(meta: dict) -> dict[str, str]:
    """A LoggedModel's tags: its precision and what fp8exp_model.json says, to compare at a glance."""
    return {"precision": meta["precision"], "fp8exp.task": meta["task"], "fp8exp.input": meta["input"],
            "fp8exp.class_names": ", ".join(meta["class_names"]),
            "fp8exp.sequence_length": str(meta["sequence_length"]),
            "fp8exp.quantized_layers": str(len(meta["quantized_layers"])),
            "fp8exp.recipe_layers": str(len(meta.get("recipe_layers", {}))),
            "fp8exp.model_format": str(meta["format"]), "fp8exp.version": meta["fp8exp_version"],
            "fp8exp.keras_version": meta["keras_version"]}


def create_logged_model(run, cfg, meta: dict):
    """(the run's new LoggedModel, "") or (None, why there is none): created at once, outside the
    queue, as everything after it needs its id; a store away or refusing it is no error."""
    from fp8exp.config import offline_uri

    if run.uri == offline_uri(cfg):
        return None, "the run is in the offline store, and tracking_sync delivers a run's artifacts"
    if run.in_outage:
        return None, f"the tracking store {run.uri} is unreachable"
    try:
        created = run.client.get_run(run.run_id)
        params = run.journal.params or created.data.params  # a resumed run logged none in this process
        model = run.client.create_logged_model(
            created.info.experiment_id, name=MODEL_NAME, source_run_id=run.run_id, tags=model_tags(meta),
            params=dict(params), model_type=MODEL_TYPES[meta["task"]])
    except Exception as error:  # noqa: BLE001  (a model is not worth failing a trained run)
        first = str(error).splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return None, f"the tracking store {run.uri} could not create it: {first}"
    return model, ""


def model_metrics(journal_metrics, model_id: str):
    """(the latest value of each MODEL_METRICS key, with model_id, the step of the test metrics):
    the same timestamps and steps as logged on the run, so the run's history gains no points."""
    from mlflow.entities import Metric

    latest = {}
    for metric in list(journal_metrics):  # (the system-metrics thread appends meanwhile)
        if metric.key.startswith(MODEL_METRICS):
            latest[metric.key] = metric
    step = max((m.step for key, m in latest.items() if key.startswith("test/")), default=0)
    return [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in latest.values()], step


def register_version(client, name: str, source: str, run_id: str, precision: str, model_id: str | None = None):
    """A version of registered model `name` (created if new) for `source`, tagged with the precision,
    and named in the LoggedModel's tag `mlflow.modelVersions` (where the UI looks), as
    `mlflow.register_model` does. Sent again after an outage, it finds its version instead of adding
    one. The source is the model's storage location, not `models:/<model_id>`: a SQLite registry
    resolves that through the process's global tracking URI, not this client's (MLflow 3.17)."""
    import json

    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    escaped = name.replace("'", "\\'")
    version = next((v for v in client.search_model_versions(f"name = '{escaped}' AND run_id = '{run_id}'")
                    if v.source == source), None)
    if version is None:
        version = client.create_model_version(name, source, run_id=run_id, tags={"precision": precision},
                                              model_id=model_id, await_creation_for=0)
    if model_id:
        listed = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
        entry = {"name": version.name, "version": str(version.version)}
        if entry not in listed:
            client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps([*listed, entry])})
    return version
