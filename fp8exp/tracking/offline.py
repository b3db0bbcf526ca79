"""Deliver runs that a tracking server could not take.

A run whose server went away for good mid-run (or was unreachable at start, with
tracking.required=false) is written whole into a local SQLite store, the offline store
(`tracking.offline_uri`, default `sqlite:///<launch dir>/mlflow-offline.db`), tagged
`fp8exp.sync.status=pending` with the server it was meant for. When the server is back:

    python -m fp8exp.tracking_sync [--from sqlite:///mlflow-offline.db] [--to http://host:5000]

tops up the server's copy of each pending run that has ended (the same run id, when the server
has the part it received before the outage; a new run otherwise) with the params, tags, metric
values, dataset inputs and artifacts it lacks, sets its final status, and marks the offline copy
`done`. A run still training is skipped: it stays pending. Running it twice, or again after a sync
that broke off, sends nothing twice: the server run's id is recorded as soon as it exists, metric
values are matched by (key, step, timestamp, value) and datasets by (name, digest). A sweep's
parent goes first, so that its children (`mlflow.parentRunId`) nest under its server copy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SYNC_TAGS = ("fp8exp.sync.status", "fp8exp.sync.target_uri", "fp8exp.sync.remote_run_id")
ENDED = ("FINISHED", "FAILED", "KILLED")
METRIC_LIMIT = 1000
PARAM_LIMIT = 100


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
    inputs: list = field(default_factory=list)
    """DatasetInputs (the run's data, see datasets.py)."""


def write_offline(journal: Journal, status: str, end_time: int, uri: str, remote_uri: str, remote_run_id: str | None) -> str:
    """Write everything `journal` holds as a run of the offline store at `uri`; returns its id."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from fp8exp.tracking.store import ensure_experiment, offline_artifact_root

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, journal.experiment, offline_artifact_root(uri))
    tags = {**journal.tags, "fp8exp.sync.status": "pending", "fp8exp.sync.target_uri": remote_uri}
    if remote_run_id:
        tags["fp8exp.sync.remote_run_id"] = remote_run_id
    run_id = client.create_run(experiment_id, start_time=journal.start_time, run_name=journal.run_name).info.run_id
    _log_batches(client, run_id, params=[Param(k, v) for k, v in journal.params.items()],
                 tags=[RunTag(k, v) for k, v in tags.items()], metrics=journal.metrics)
    if journal.inputs:
        client.log_inputs(run_id, datasets=journal.inputs)
    for artifact_file, text in journal.texts.items():
        client.log_text(run_id, text, artifact_file)
    for artifact_dir, path in journal.files.items():
        if artifact_dir.endswith("/") and Path(path).is_dir():
            client.log_artifacts(run_id, path, artifact_dir.rstrip("/"))
        elif Path(path).is_file():
            client.log_artifact(run_id, path, artifact_dir)
    client.set_terminated(run_id, status, end_time)
    return run_id


def _log_batches(client, run_id: str, params=(), tags=(), metrics=()) -> None:
    params, tags, metrics = list(params), list(tags), list(metrics)
    for start in range(0, len(params), PARAM_LIMIT):
        client.log_batch(run_id, params=params[start:start + PARAM_LIMIT])
    for start in range(0, len(tags), PARAM_LIMIT):
        client.log_batch(run_id, tags=tags[start:start + PARAM_LIMIT])
    for start in range(0, len(metrics), METRIC_LIMIT):
        client.log_batch(run_id, metrics=metrics[start:start + METRIC_LIMIT])


def _metric_id(metric) -> tuple:
    value = "nan" if math.isnan(metric.value) else metric.value
    return metric.key, metric.step, metric.timestamp, value


def server_parent(source, run) -> str | None:
    """The `mlflow.parentRunId` to send: a parent in the offline store (a sweep started with its
    server away) is named by its server copy's id, None while it has none."""
    from mlflow.exceptions import MlflowException

    parent_id = run.data.tags.get("mlflow.parentRunId")
    try:
        parent = source.get_run(parent_id) if parent_id else None
    except MlflowException:  # the parent is on the server already
        return parent_id
    return parent.data.tags.get("fp8exp.sync.remote_run_id") if parent else None


MODEL_ID_TAG = "fp8exp.model_id"  # the run's LoggedModel on the server (serve/save.py)


def _close_pending_model(target, model_id: str | None) -> None:
    """A run that went offline after its LoggedModel was created leaves that model PENDING on the
    server, with its files in the run's artifact model/ instead (delivered above): mark it FAILED,
    so neither the Models tab nor MLflow's runs:/ resolution takes the empty model."""
    if not model_id:
        return
    from mlflow.entities import LoggedModelStatus

    try:
        model = target.get_logged_model(model_id)
    except Exception:  # noqa: BLE001  (never created there, or an old server: nothing to close)
        return
    if str(model.status).endswith("PENDING"):
        target.finalize_logged_model(model_id, LoggedModelStatus.FAILED)


def sync_run(source, run, target_uri: str, parent_id: str | None = None) -> tuple[str, int]:
    """Top up (or create) the target's copy of the offline `run` (a child of `parent_id` there);
    returns (target run id, metric values sent)."""
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from fp8exp.tracking.store import ensure_experiment

    target = MlflowClient(target_uri)
    tags = dict(run.data.tags)
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    remote_id = tags.get("fp8exp.sync.remote_run_id")
    remote = None
    if remote_id:
        try:
            remote = target.get_run(remote_id)
        except MlflowException:
            remote = None
    if remote is None:
        experiment = source.get_experiment(run.info.experiment_id).name
        experiment_id = ensure_experiment(target, experiment, None)
        remote = target.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name)
        # Recorded now: a sync that breaks off below and is run again tops up this run, not a new one.
        source.set_tag(run.info.run_id, "fp8exp.sync.remote_run_id", remote.info.run_id)
    remote_id = remote.info.run_id

    params = [Param(k, v) for k, v in run.data.params.items() if k not in remote.data.params]
    new_tags = [RunTag(k, v) for k, v in tags.items() if k not in SYNC_TAGS and remote.data.tags.get(k) != v]
    metrics = []
    for key in run.data.metrics:
        have = {_metric_id(m) for m in target.get_metric_history(remote_id, key)}
        metrics += [m for m in source.get_metric_history(run.info.run_id, key) if _metric_id(m) not in have]
    _log_batches(target, remote_id, params=params, tags=new_tags, metrics=metrics)
    known = {(i.dataset.name, i.dataset.digest) for i in remote.inputs.dataset_inputs} if remote.inputs else set()
    inputs = [i for i in (run.inputs.dataset_inputs if run.inputs else [])
              if (i.dataset.name, i.dataset.digest) not in known]
    if inputs:  # the run's datasets (the UI's Dataset column)
        target.log_inputs(remote_id, datasets=inputs)
    with tempfile.TemporaryDirectory(prefix="fp8exp-sync-") as tmp:
        if source.list_artifacts(run.info.run_id):
            local = source.download_artifacts(run.info.run_id, "", tmp)
            target.log_artifacts(remote_id, local)
    target.set_terminated(remote_id, run.info.status, run.info.end_time)
    _close_pending_model(target, tags.get(MODEL_ID_TAG))
    source.set_tag(run.info.run_id, "fp8exp.sync.status", "done")
    return remote_id, len(metrics)


def not_ready(run, parent_id: str | None) -> str | None:
    """Why `run` waits for a later sync: a run still training (tracking.required=false logs it
    here from its start) is not sent half-done, and a child not before its parent."""
    if run.info.status not in ENDED:
        return f"still {run.info.status}"
    if parent_id is None and "mlflow.parentRunId" in run.data.tags:
        return f"its parent run {run.data.tags['mlflow.parentRunId']} is not delivered yet"
    return None


def sync(source_uri: str, target_uri: str | None = None, out=sys.stdout) -> int:
    """Deliver every pending run of `source_uri`; returns how many could not be delivered."""
    from mlflow.tracking import MlflowClient

    source = MlflowClient(source_uri)
    experiments = [e.experiment_id for e in source.search_experiments()]
    pending = source.search_runs(experiments, "tags.`fp8exp.sync.status` = 'pending'") if experiments else []
    if not pending:
        print(f"fp8exp.tracking_sync: nothing pending in {source_uri}", file=out)
        return 0
    pending.sort(key=lambda run: "mlflow.parentRunId" in run.data.tags)  # a sweep's parent before its children
    failed = skipped = 0
    for run in pending:
        label = f"  {run.info.run_id} {run.info.run_name}"
        target = target_uri or run.data.tags["fp8exp.sync.target_uri"]
        parent_id = server_parent(source, run)
        wait = not_ready(run, parent_id)
        if wait:
            skipped += 1
            print(f"{label}: skipped, {wait}; it stays pending for the next sync", file=out)
            continue
        try:
            remote_id, sent = sync_run(source, run, target, parent_id)
        except Exception as error:  # noqa: BLE001  (one unreachable target does not stop the others)
            failed += 1
            print(f"{label}: NOT delivered to {target}: {str(error).splitlines()[0][:200]}", file=out)
            continue
        print(f"{label}: delivered to {target} as run {remote_id} ({sent} metric values, status {run.info.status})",
              file=out)
    print(f"fp8exp.tracking_sync: {len(pending) - failed - skipped} of {len(pending)} pending runs delivered"
          + (f", {skipped} skipped" if skipped else ""), file=out)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8exp.tracking_sync", description=__doc__.split("\n\n")[0])
    default = f"sqlite:///{os.path.join(os.getcwd(), 'mlflow-offline.db')}"
    parser.add_argument("--from", dest="source", default=default, help=f"offline store (default: {default})")
    parser.add_argument("--to", dest="target", default=None,
                        help="tracking server (default: the one each run was meant for)")
    args = parser.parse_args(argv)
    if args.source.startswith("sqlite:///") and not Path(args.source[len("sqlite:///"):]).is_file():
        print(f"fp8exp.tracking_sync: error: no offline store at {args.source}", file=sys.stderr)
        return 2
    return 1 if sync(args.source, args.target) else 0


if __name__ == "__main__":
    sys.exit(main())
