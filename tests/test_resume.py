"""Resumption at the edges: a stop after the last step, and a run whose process died without a word
(SIGKILL, the OOM killer) and so stayed RUNNING."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from fp8exp.run import checkpoint, stopping
from fp8exp.run.experiment import run_experiment
from fp8exp.run.resume import process_gone
from fp8exp.tracking.callbacks import HEARTBEAT_TAG, PID_TAG
from tests.conftest import tracked


def client_of(tmp_path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
def test_a_stop_during_the_final_validation_resumes_to_an_evaluated_saved_run(tmp_path, monkeypatch):
    base = ("precision=float8", "tracking.experiment=end", "tracking.fp8_gemm_check=false")
    stop_at_the_end = checkpoint.Checkpointer.on_epoch_end

    def sigterm_in_final_validation(self, epoch, logs=None):
        if self.step == self.total_steps:
            self.stop.signum = signal.SIGTERM
        return stop_at_the_end(self, epoch, logs)

    monkeypatch.setattr(checkpoint.Checkpointer, "on_epoch_end", sigterm_in_final_validation)
    with pytest.raises(stopping.Interrupted) as stopped:
        run_experiment(tracked(tmp_path, *base))
    assert stopped.value.checkpoint_step == 32  # 16 steps per epoch, 2 epochs: the last one
    monkeypatch.undo()

    outcome = run_experiment(tracked(tmp_path, *base, "trainer.resume=true"))
    run = client_of(tmp_path).get_run(outcome.run_id)
    assert outcome.run_id == stopped.value.run_id and run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["test/accuracy"] <= 1.0 and run.data.tags["resume.count"] == "1"
    artifacts = {a.path for a in client_of(tmp_path).list_artifacts(outcome.run_id)}
    assert "fp8" in artifacts
    [model] = client_of(tmp_path).search_logged_models([run.info.experiment_id], f"source_run_id = '{outcome.run_id}'")
    assert model.name == "model" and str(model.status) in ("READY", "LoggedModelStatus.READY")
    layers = client_of(tmp_path).download_artifacts(outcome.run_id, "fp8/layers.md", str(tmp_path))
    assert "FP8 covers 8 layers" in open(layers).read()
    # Nothing left to train: it does not resume again, a new run starts.
    assert run_experiment(tracked(tmp_path, *base, "trainer.resume=true", "trainer.epochs=1")).run_id != outcome.run_id


@pytest.mark.slow
def test_resume_takes_over_a_running_run_whose_process_is_gone(tmp_path, monkeypatch):
    base = ("tracking.experiment=gone", "tracking.save_model=false", "trainer.checkpoint_every=8")

    def die_at_step_12(self, batch, logs=None):
        super(checkpoint.Checkpointer, self).on_train_batch_end(batch, logs)
        if self.step == 12:
            raise stopping.Interrupted(signal.SIGKILL, self.step)
        if self._due():
            self._save()

    monkeypatch.setattr(checkpoint.Checkpointer, "on_train_batch_end", die_at_step_12)
    with pytest.raises(stopping.Interrupted) as died:
        run_experiment(tracked(tmp_path, *base))
    monkeypatch.undo()
    client = client_of(tmp_path)
    # What SIGKILL leaves: the run still RUNNING, its checkpoint, and a pid that is no more.
    finished = subprocess.Popen(["true"])
    finished.wait()
    client.update_run(died.value.run_id, "RUNNING")
    client.set_tag(died.value.run_id, PID_TAG, str(finished.pid))
    assert client.get_run(died.value.run_id).data.tags["checkpoint.step"] == "8"

    outcome = run_experiment(tracked(tmp_path, *base, "trainer.resume=true"))
    run = client.get_run(outcome.run_id)
    assert outcome.run_id == died.value.run_id and run.info.status == "FINISHED"
    assert "process gone" in run.data.tags["resume.history"] and "KILLED" in run.data.tags["resume.history"]


def test_a_running_run_elsewhere_is_gone_only_once_its_heartbeat_is_stale(tmp_path):
    client = client_of(tmp_path)
    experiment = client.create_experiment("alive")
    run = client.create_run(experiment, tags={PID_TAG: "1", "fp8exp.host": "elsewhere"})
    client.set_tag(run.info.run_id, HEARTBEAT_TAG, "0")  # a heartbeat from 1970
    assert process_gone(client.get_run(run.info.run_id), stale_after_s=600)
    client.set_tag(run.info.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
    assert not process_gone(client.get_run(run.info.run_id), stale_after_s=600)


def offline(tmp_path, port: int, *overrides: str):
    return tracked(tmp_path, f"tracking.uri=http://127.0.0.1:{port}", "tracking.required=false",
                   f"tracking.offline_uri=sqlite:///{tmp_path / 'offline.db'}", "tracking.save_model=false",
                   "tracking.experiment=offline-resume", *overrides)


@pytest.mark.slow
def test_resume_with_the_server_down_continues_the_offline_copy_or_refuses(tmp_path, monkeypatch):
    from fp8exp.config import ConfigError
    from tests.servers import free_port

    port = free_port()  # nothing listens there: the server is down
    with pytest.raises(ConfigError, match="trainer.resume: the tracking server .* is unreachable and the offline store"):
        run_experiment(offline(tmp_path, port, "trainer.resume=true"))

    def stop_at_step_12(self, batch, logs=None):
        super(checkpoint.Checkpointer, self).on_train_batch_end(batch, logs)
        if self._due():
            self._save()
        if self.step == 12:
            raise stopping.Interrupted(signal.SIGTERM, self.step, self.last_saved)

    monkeypatch.setattr(checkpoint.Checkpointer, "on_train_batch_end", stop_at_step_12)
    with pytest.raises(stopping.Interrupted) as stopped:
        run_experiment(offline(tmp_path, port, "trainer.checkpoint_every=8"))
    monkeypatch.undo()

    outcome = run_experiment(offline(tmp_path, port, "trainer.checkpoint_every=8", "trainer.resume=true"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'offline.db'}")
    run = client.get_run(outcome.run_id)
    assert outcome.run_id == stopped.value.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resume.count"] == "1" and run.data.tags["fp8exp.sync.status"] == "pending"
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val/loss")] == [1, 2]
