"""`python -m fp8exp.tracking_sync`: only runs that have ended are delivered, a sync cut short and
run again tops up the server run it made (no second copy), and a sweep that started with its
server away (tracking.required=false) arrives as one parent with its children nested."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fp8exp.tracking import offline
from fp8exp.tracking.store import ensure_experiment, offline_artifact_root
from tests.servers import tracking_server
from tests.test_sweep import TINY, run_sweep


def stores(tmp: Path) -> tuple[str, str]:
    """An offline store and a stand-in for the server (a SQLite store: no network needed)."""
    return f"sqlite:///{tmp / 'offline.db'}", f"sqlite:///{tmp / 'server.db'}"


def pending_run(uri: str, target: str, status: str | None = None) -> str:
    """A run as tracking.required=false logs it: in the offline store, pending from its start."""
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "fp8exp", offline_artifact_root(uri))
    run_id = client.create_run(experiment, run_name="offline", tags={
        "fp8exp.sync.status": "pending", "fp8exp.sync.target_uri": target}).info.run_id
    client.log_metric(run_id, "train/loss", 0.5, step=1)
    client.log_text(run_id, "precision: float8\n", "config.yaml")
    if status:
        client.set_terminated(run_id, status)
    return run_id


def runs_in(uri: str):
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_run_still_training_stays_pending_until_it_has_ended(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stand-in server keeps its artifacts under ./mlruns
    source, target = stores(tmp_path)
    run_id = pending_run(source, target)
    out = io.StringIO()
    assert offline.sync(source, target, out) == 0
    assert f"{run_id} offline: skipped, still RUNNING" in out.getvalue()
    assert runs_in(target) == []
    assert MlflowClient(source).get_run(run_id).data.tags["fp8exp.sync.status"] == "pending"

    MlflowClient(source).set_terminated(run_id, "FINISHED")
    assert offline.sync(source, target, out) == 0
    [copy] = runs_in(target)
    assert copy.info.status == "FINISHED" and copy.data.metrics == {"train/loss": 0.5}
    assert MlflowClient(source).get_run(run_id).data.tags["fp8exp.sync.status"] == "done"


def test_a_sync_cut_short_tops_up_the_same_server_run_when_rerun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, target = stores(tmp_path)
    run_id = pending_run(source, target, "FAILED")

    def upload_fails(self, *args, **kwargs):
        raise OSError("connection reset by peer")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_artifacts", upload_fails)
        assert offline.sync(source, target, io.StringIO()) == 1
    assert offline.sync(source, target, io.StringIO()) == 0
    [copy] = runs_in(target)  # one server run, not a second beside a RUNNING first
    assert copy.info.status == "FAILED" and copy.data.metrics == {"train/loss": 0.5}
    assert [a.path for a in MlflowClient(target).list_artifacts(copy.info.run_id)] == ["config.yaml"]
    assert MlflowClient(source).get_run(run_id).data.tags["fp8exp.sync.remote_run_id"] == copy.info.run_id


@pytest.mark.slow
def test_a_sweep_started_offline_syncs_as_one_parent_with_its_children(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    MlflowClient(f"sqlite:///{root / 'server.db'}").search_experiments()  # the schema, before the server
    server = tracking_server(root / "server.db", root / "artifacts", root / "server.log")  # its port: closed
    offline_uri = f"sqlite:///{tmp_path / 'offline.db'}"
    sweep = run_sweep(tmp_path, f"tracking.uri={server.url}", "tracking.required=false",
                      f"tracking.offline_uri={offline_uri}", "trainer.seed=0,1", *TINY, "tracking.save_model=false",
                      "tracking.fp8_probe=false")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "fp8exp sweep: 2 of 2 jobs ran, 2 finished, 0 failed" in sweep.stdout
    assert f"python -m fp8exp.tracking_sync --from {offline_uri}" in sweep.stdout
    [local_parent] = [r for r in runs_in(offline_uri) if "sweep.jobs" in r.data.tags]
    assert local_parent.info.status == "FINISHED"

    try:
        server.start()
        assert offline.main(["--from", offline_uri]) == 0  # to the server each run was meant for
        runs = runs_in(server.url)
    finally:
        server.stop()
    [parent] = [r for r in runs if "sweep.jobs" in r.data.tags]
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.finished"] == "2"
    assert sorted(c.info.run_name[-3:] for c in children) == ["-s0", "-s1"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and "test/accuracy" in child.data.metrics


def test_a_logged_model_left_pending_by_a_run_gone_offline_is_closed_at_sync(tmp_path):
    source, target = stores(tmp_path)
    server = MlflowClient(target)
    experiment = ensure_experiment(server, "fp8exp", (tmp_path / "server-artifacts").as_uri())
    remote = server.create_run(experiment, run_name="offline").info.run_id
    model = server.create_logged_model(experiment, name="model", source_run_id=remote)  # then the server went away
    run_id = pending_run(source, target, status="FINISHED")
    MlflowClient(source).set_tag(run_id, "fp8exp.sync.remote_run_id", remote)
    MlflowClient(source).set_tag(run_id, offline.MODEL_ID_TAG, model.model_id)
    assert str(server.get_logged_model(model.model_id).status).endswith("PENDING")
    assert offline.sync(source, out=io.StringIO()) == 0
    assert str(server.get_logged_model(model.model_id).status).endswith("FAILED")
