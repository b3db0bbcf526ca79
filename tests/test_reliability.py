"""Runs that survive: SIGTERM mid-epoch and an exact resume, a NaN that fails cleanly, float16
overflows that do not, a tracking server stopped and restarted mid-run (a real `mlflow server`
on 127.0.0.1), two sweeps at once against one server, bitwise determinism, and credentials kept
out of the store."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient

from fp8exp.config import ConfigError, validate
from fp8exp.run import checkpoint, stopping, train
from fp8exp.run.experiment import run_experiment
from fp8exp.run.launch import LaunchContext
from fp8exp.run.resume import find_resume
from fp8exp.tracking import offline as tracking_sync
from fp8exp.tracking import redact
from fp8exp.tracking.callbacks import StepCallback
from tests.conftest import FAST, ROOT, compose_config, tracked
from tests.servers import free_port, tracking_server

EPOCH_METRICS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy"]
TINY_SWEEP = [*FAST, "trainer.epochs=1", "trainer.steps_per_epoch=4", "trainer.eval_steps=1",
              "tracking.fp8_log_every=2", "tracking.fp8_probe=false"]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def store_of(tmp: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


def killing_after(step: int, action):
    """Patch for train.fit_and_evaluate: `action(step)` right after optimizer step `step`."""
    import keras

    original = train.fit_and_evaluate

    class At(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.counter.step == step:
                action(step)

    def patched(model, splits, trainer, callbacks, **kwargs):
        at = At()
        at.counter = next(c for c in callbacks if isinstance(c, StepCallback))
        return original(model, splits, trainer, [*callbacks, at], **kwargs)

    return patched


# --- checkpoints ---------------------------------------------------------------------------

def small_state(value: float) -> checkpoint.TrainingState:
    meta = {"format": checkpoint.FORMAT, "step": int(value), "epoch": 0, "batch": int(value), "dtypes": {},
            "paths": {"trainable": ["w"]}}
    return checkpoint.TrainingState({"trainable/00000": np.full(1000, value)}, meta)


def test_a_crash_mid_write_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.npz"
    checkpoint.write(path, small_state(1.0))

    def dying_savez(handle, **arrays):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("power cut")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(OSError, match="power cut"):
        checkpoint.write(path, small_state(2.0))
    monkeypatch.undo()
    assert checkpoint.read(path).step == 1
    assert np.all(checkpoint.read(path).group("trainable")[0] == 1.0)
    # A damaged file (here: the interrupted partial one) is refused, not half-loaded.
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.read(path.with_name("last.npz.partial"))


# --- secrets -------------------------------------------------------------------------------

SECRET = "hunter2-very-secret"


def test_secret_looking_values_are_masked():
    env = {"MLFLOW_TRACKING_PASSWORD": SECRET, "HF_TOKEN": "hf_abcdefgh", "HOME": "/root", "DEBUG": "1"}
    with mock.patch.dict(os.environ, env):
        assert redact.secret_values() == sorted([SECRET, "hf_abcdefgh"], key=len, reverse=True)
        assert redact.flat({"data.api_key": "k-123", "data.signal_tokens": "8", "x.note": f"pw {SECRET}",
                            "tracking.uri": "http://bob:pa55@host:5000"}) == {
            "data.api_key": "***", "data.signal_tokens": "8", "x.note": "pw ***",
            "tracking.uri": "http://bob:***@host:5000"}
        assert redact.overrides(f"+data.api_token=t0k model.hidden_dim=32 tracking.run_name={SECRET}") == \
            "+data.api_token=*** model.hidden_dim=32 tracking.run_name=***"


def test_servers_bind_to_loopback_unless_told_otherwise():
    makefile = (ROOT / "Makefile").read_text()
    assert "HOST ?= 127.0.0.1" in makefile and "--host $(HOST)" in makefile  # make ui
    cfg = compose_config(*FAST)
    from fp8exp.tracking.store import ui_command

    assert "--host 127.0.0.1" in ui_command(cfg)  # what every run prints
    for path in (ROOT / "fp8exp").rglob("*.py"):  # nothing in fp8exp opens a port to the world
        assert "0.0.0.0" not in path.read_text(), path


# --- determinism, and what a real run records ------------------------------------------------

@pytest.mark.slow
def test_two_identical_runs_are_bitwise_identical_and_keep_secrets_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    overrides = ["precision=float32", "trainer.epochs=2", f"tracking.run_name=leak-{SECRET}"]
    context = LaunchContext(overrides=[*overrides, "tracking.uri=http://bob:pw-in-url@127.0.0.1:1"])
    client = store_of(tmp_path)
    runs = [run_experiment(tracked(tmp_path, *overrides), context).run_id for _ in range(2)]

    for key in [*EPOCH_METRICS, "test/loss", "test/accuracy"]:
        first, second = (history(client, run_id, key) for run_id in runs)
        assert first and first == second, key  # bitwise: float equality, every step

    run = client.get_run(runs[0])
    assert run.data.params["tracking.run_name"] == "leak-***"
    assert run.info.run_name == "leak-***"
    assert run.data.tags["overrides"].endswith("tracking.uri=http://bob:***@127.0.0.1:1")
    config_yaml = Path(client.download_artifacts(runs[0], "config.yaml", str(tmp_path))).read_text()
    assert "run_name: leak-***" in config_yaml
    recorded = json.dumps([run.data.params, run.data.tags]) + config_yaml
    assert SECRET not in recorded and "pw-in-url" not in recorded


# --- numerical faults ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_nan_stops_training_naming_the_step_and_fp8_layers(tmp_path):
    cfg = tracked(tmp_path, "precision=float8", "trainer.learning_rate=1e30", "trainer.epochs=1",
                  "trainer.checkpoint_every=1", "tracking.fp8_log_every=1", "tracking.fp8_probe=false")
    with pytest.raises(stopping.NumericalFault) as caught:
        run_experiment(cfg)
    fault = caught.value
    assert f"at step {fault.step}" in str(fault) and fault.step >= 2
    assert fault.fp8_tensors and all(t.endswith(("_scale", "_amax_history")) for t in fault.fp8_tensors)

    client = store_of(tmp_path)
    [run] = client.search_runs([client.get_experiment_by_name("fp8exp").experiment_id])
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["failure.reason"] == "non_finite" and tags["failure.step"] == str(fault.step)
    assert tags["failure.non_finite_fp8"] == ", ".join(fault.fp8_tensors)
    assert tags["failure.error"].startswith("NumericalFault: non-finite")
    # The last good checkpoint is kept: written before the fault, and finite.
    kept = int(tags["checkpoint.step"])
    assert kept < fault.step and tags["failure.last_good_checkpoint"] == str(kept)
    state = checkpoint.read(Path(client.download_artifacts(run.info.run_id, checkpoint.ARTIFACT, str(tmp_path))))
    assert state.step == kept
    assert all(np.all(np.isfinite(a)) for a in state.group("trainable"))


def test_a_nan_loss_names_its_step():
    import keras

    guard = stopping.NonFiniteGuard(lambda: 12)
    guard.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    guard.step = 16  # resumed at the start of epoch 2
    guard.on_epoch_begin(1)
    guard.on_train_batch_end(0, {"loss": 0.5})
    with pytest.raises(stopping.NumericalFault, match=r"non-finite loss \(nan\) at step 18; the last good "
                                                      r"checkpoint \(step 12\) is kept"):
        guard.on_train_batch_end(1, {"loss": float("nan")})


def test_a_signal_during_a_due_save_stops_right_after_it_with_that_checkpoint():
    """One process decides the stop once per step (as several do, from their gathered signals),
    but a signal that lands while this step's checkpoint is written needs no further step."""
    stop, saved = stopping.GracefulStop(), []

    def save(model, step):
        saved.append(step)
        stop.signum = signal.SIGTERM  # arrives during the write
        return True

    checkpointer = checkpoint.Checkpointer(2, steps_per_epoch=10, total_steps=10, stop=stop, save=save)
    checkpointer.set_model(object())
    checkpointer.on_train_batch_end(0)  # step 1: nothing due
    with pytest.raises(stopping.Interrupted) as stopped:
        checkpointer.on_train_batch_end(1)  # step 2: due
    assert saved == [2] and stopped.value.checkpoint_step == 2


def test_a_stop_signal_waits_for_the_step_then_reaches_a_launchers_own_handler():
    """submitit requeues a SLURM job from its SIGUSR2 handler: it still runs, after the checkpoint."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(stopping.Interrupted) as caught, stopping.GracefulStop() as stop:
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGUSR2)
                assert stop.requested and not seen  # training goes on to the step's end
            raise stopping.Interrupted(stop.signum, 7, 7)
        assert seen == [signal.SIGUSR2] and caught.value.exit_code == 128 + signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.slow
def test_float16_overflows_are_skipped_not_fatal(tmp_path, monkeypatch):
    import keras

    from fp8exp.precision import policy as precision

    # Start the loss scale absurdly high: the first steps' float16 gradients overflow.
    monkeypatch.setattr(precision, "optimizer", lambda p, lr: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(lr), initial_scale=2.0 ** 30))
    outcome = run_experiment(tracked(tmp_path, "precision=mixed_float16", "trainer.epochs=1", "trainer.eval_steps=1"))
    run = store_of(tmp_path).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    # Each overflowing step is skipped and halves the scale; the other steps of 16 train.
    assert 3 <= run.data.metrics["train/skipped_steps"] < 16
    assert run.data.metrics["train/loss_scale"] < 2.0 ** 30
    assert math.isfinite(run.data.metrics["test/loss"])


# --- interruption and resume -------------------------------------------------------------------

class SigtermHandshake(Callback):
    """Test-only Hydra callback (on the command line): after optimizer step `step`, training
    waits in a callback until the test has sent SIGTERM from outside and said so."""

    def __init__(self, step: int, ready: str, sent: str):
        self.step, self.ready, self.sent = step, Path(ready), Path(sent)

    def on_job_start(self, config, **kwargs):
        def wait_for_sigterm(step):
            self.ready.touch()
            deadline = time.monotonic() + 120
            while not self.sent.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

        train.fit_and_evaluate = killing_after(self.step, wait_for_sigterm)


RESUMED = ["precision=float8", "trainer.epochs=3", "tracking.fp8_log_every=8", "tracking.fp8_probe=false",
           "tracking.fp8_gemm_check=false", "trainer.checkpoint_every=12"]


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'artifacts'}"]
    ready, sent = tmp_path / "ready", tmp_path / "sent"
    hook = ["+hydra.callbacks.sigterm._target_=tests.test_reliability.SigtermHandshake",
            "+hydra.callbacks.sigterm.step=20", f"+hydra.callbacks.sigterm.ready={ready}",
            f"+hydra.callbacks.sigterm.sent={sent}"]
    process = subprocess.Popen([sys.executable, "-m", "fp8exp", *FAST, *RESUMED, *store, *hook], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), process.communicate()[1][-3000:]
        process.send_signal(signal.SIGTERM)  # mid-epoch 2: 16 steps per epoch
        sent.touch()
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert "fp8exp: interrupted by SIGTERM after step 21; checkpoint of step 21 saved" in stderr
    assert "trainer.resume=true" in stderr

    client = store_of(tmp_path)
    [killed] = client.search_runs([client.get_experiment_by_name("fp8exp").experiment_id])
    assert killed.info.status == "KILLED"
    assert killed.data.tags["killed.signal"] == "SIGTERM"
    assert (killed.data.tags["checkpoint.step"], killed.data.tags["checkpoint.epoch"]) == ("21", "1")
    assert [step for step, _ in history(client, killed.info.run_id, "train/loss")] == [1]  # epoch 2 unfinished

    resumed = run_experiment(compose_config(*FAST, *RESUMED, *store, "trainer.resume=true"))
    reference = run_experiment(compose_config(*FAST, *RESUMED, *store, "tracking.experiment=uninterrupted"))
    assert resumed.run_id == killed.info.run_id  # the same MLflow run continued
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert "killed.signal" not in run.data.tags
    assert run.data.tags["resume.history"] == "#1: KILLED killed.signal=SIGTERM killed.step=21"
    assert "fp8.gemm" not in run.data.tags and "perf/fp8_gemm_check_s" not in run.data.metrics  # check off
    fp8_keys = [k for k in run.data.metrics if k.startswith("fp8/") and k.endswith(("_scale", "_amax"))]
    assert fp8_keys
    for key in [*EPOCH_METRICS, "test/loss", "test/accuracy", *fp8_keys]:
        # Exact on CPU: same steps, same values, nothing logged twice.
        assert history(client, resumed.run_id, key) == history(client, reference.run_id, key), key


def test_resume_needs_a_matching_unfinished_run(tmp_path):
    client = store_of(tmp_path)
    experiment = client.create_experiment("fp8exp")
    finished = client.create_run(experiment).info.run_id
    client.set_terminated(finished, "FINISHED")
    with pytest.raises(ConfigError, match="already FINISHED"):
        find_resume(tracked(tmp_path, f"trainer.resume_from={finished}"))
    other = client.create_run(experiment).info.run_id
    client.log_param(other, "model.hidden_dim", "64")
    with pytest.raises(ConfigError, match=r"different settings: model.hidden_dim=64 \(now 32\)"):
        find_resume(tracked(tmp_path, f"trainer.resume_from={other}"))
    assert find_resume(tracked(tmp_path, "trainer.resume=true")) is None  # nothing: start fresh
    with pytest.raises(ConfigError, match="trainer.resume: needs tracking=mlflow"):
        validate(compose_config(*FAST, "tracking=none", "trainer.resume=true"))


# --- tracking outages: a real `mlflow server` ----------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    MlflowClient(f"sqlite:///{root / 'server.db'}").search_experiments()  # create the schema here, once
    running = tracking_server(root / "server.db", root / "server-artifacts", root / "server.log")
    try:
        yield running.ensure_up()
    finally:
        running.stop()


def remote(tmp: Path, url: str, *overrides: str):
    return compose_config(*FAST, f"tracking.uri={url}", f"tracking.offline_uri=sqlite:///{tmp / 'offline.db'}",
                          "precision=mixed_bfloat16", "trainer.epochs=3", "trainer.checkpoint_every=4", *overrides)


def epoch_hook(monkeypatch, actions: dict):
    """Run actions[epoch]() at that epoch's start (before the first step)."""
    import keras

    original = train.fit_and_evaluate

    class Hook(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch in actions:
                actions[epoch]()

    monkeypatch.setattr(train, "fit_and_evaluate",
                        lambda m, s, t, callbacks, **kw: original(m, s, t, [Hook(), *callbacks], **kw))


def assert_complete(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    run = client.get_run(run_id)
    assert run.info.status == status
    assert run.data.params["precision.name"] == "mixed_bfloat16"
    for key in EPOCH_METRICS:
        assert [step for step, _ in history(client, run_id, key)] == [1, 2, 3], key  # none lost, none twice
    assert [step for step, _ in history(client, run_id, "test/accuracy")] == [48]
    assert run.data.tags["checkpoint.step"] == "44"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "checkpoints"}


@pytest.mark.slow
def test_a_server_restarted_mid_run_receives_everything(tmp_path, monkeypatch, server, capsys):
    server.ensure_up()
    epoch_hook(monkeypatch, {1: server.stop, 2: server.start})  # down for all of epoch 2
    outcome = run_experiment(remote(tmp_path, server.url))
    assert "was unreachable for part of the run" in outcome.note and "everything was delivered" in outcome.note
    assert outcome.note in capsys.readouterr().out
    assert_complete(MlflowClient(server.url), outcome.run_id)
    assert not (tmp_path / "offline.db").exists()


@pytest.mark.slow
def test_a_server_gone_at_the_end_leaves_a_complete_offline_copy_that_syncs(tmp_path, monkeypatch, server):
    # Unreachable at start: an error, unless tracking.required=false, which logs offline.
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="cannot reach the MLflow server"):
        run_experiment(remote(tmp_path, dead))
    offline_from_start = run_experiment(remote(tmp_path, dead, "tracking.required=false", "tracking.run_name=early"))
    assert f"was logged to sqlite:///{tmp_path / 'offline.db'}" in offline_from_start.note

    # Gone mid-run for good: retried for tracking.retry_s, then the whole run goes offline.
    server.ensure_up()
    epoch_hook(monkeypatch, {1: server.stop})
    outcome = run_experiment(remote(tmp_path, server.url, "tracking.retry_s=1"))
    offline = f"sqlite:///{tmp_path / 'offline.db'}"
    assert "stayed unreachable" in outcome.note and f"python -m fp8exp.tracking_sync --from {offline}" in outcome.note
    local = MlflowClient(offline)
    [copy] = local.search_runs([local.get_experiment_by_name("fp8exp").experiment_id],
                               f"tags.`fp8exp.sync.remote_run_id` = '{outcome.run_id}'")
    assert_complete(local, copy.info.run_id)

    server.start()
    assert tracking_sync.main(["--from", offline, "--to", server.url]) == 0
    assert_complete(MlflowClient(server.url), outcome.run_id)  # topped up: the same run id, nothing twice
    [early] = MlflowClient(server.url).search_runs([MlflowClient(server.url).get_experiment_by_name("fp8exp").experiment_id],
                                        "attributes.run_name = 'early'")
    assert_complete(MlflowClient(server.url), early.info.run_id)
    assert tracking_sync.main(["--from", offline, "--to", server.url]) == 0  # nothing left, nothing resent
    assert_complete(MlflowClient(server.url), outcome.run_id)


@pytest.mark.slow
def test_a_peer_failure_ending_the_run_from_another_thread_while_the_server_is_away_loses_nothing(tmp_path, server):
    """processes.watch's path on process 0: its watcher thread ends the run FAILED (and the process
    exits right after) while the training thread is stuck in a collective. With the server away,
    the whole run goes to the offline store; the training thread's own close later changes nothing."""
    import threading

    from fp8exp.tracking.context import open_run

    server.ensure_up()
    cfg = remote(tmp_path, server.url, "tracking.retry_s=1", "tracking.system_metrics=false")
    try:
        with pytest.raises(RuntimeError), open_run(cfg, "peer-failed", {}) as run:
            run.log_metrics({"train/loss_step": 0.5}, step=1)
            run.flush()
            server.stop()
            run.log_metrics({"train/loss_step": 0.25}, step=2)
            run.flush()  # queued: the server is away
            watcher = threading.Thread(target=run.end_now, args=("FAILED", {"failure.process": "1"}, cfg))
            watcher.start()
            watcher.join()
            raise RuntimeError("the collective lost its peer")  # the training thread, unstuck later
    finally:
        server.start()
    local = MlflowClient(f"sqlite:///{tmp_path / 'offline.db'}")
    [copy] = local.search_runs([local.get_experiment_by_name("fp8exp").experiment_id],
                               f"tags.`fp8exp.sync.remote_run_id` = '{run.run_id}'")
    assert copy.info.status == "FAILED" and copy.data.tags["failure.process"] == "1"
    assert "failure.error" not in copy.data.tags  # the training thread's failure came after the close
    assert history(local, copy.info.run_id, "train/loss_step") == [(1, 0.5), (2, 0.25)]
    assert tracking_sync.main(["--from", f"sqlite:///{tmp_path / 'offline.db'}", "--to", server.url]) == 0
    delivered = MlflowClient(server.url).get_run(run.run_id)
    assert delivered.info.status == "FAILED" and delivered.data.tags["failure.process"] == "1"


# --- concurrency --------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_parallel_sweeps_at_once_on_one_server_keep_their_children_apart(tmp_path, server):
    """Two sweeps started together, two jobs each in parallel: four jobs writing to one server.
    (test_sweep.py covers a parallel sweep on a SQLite store.)"""
    server.ensure_up()
    common = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "precision=mixed_bfloat16,float8",
              *TINY_SWEEP, f"tracking.uri={server.url}", "tracking.experiment=concurrent"]
    sweeps = {}
    for width in (32, 64):
        cwd = tmp_path / f"h{width}"
        cwd.mkdir()
        sweeps[width] = subprocess.Popen([sys.executable, "-m", "fp8exp", *common, f"model.hidden_dim={width}"],
                                         cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    results = {width: process.communicate(timeout=600) for width, process in sweeps.items()}
    for width, process in sweeps.items():
        assert process.returncode == 0, results[width][1][-3000:]

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("concurrent").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if "sweep.jobs" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 4 and len(runs) == 6  # nothing lost, nothing twice
    for parent in parents:
        width = parent.data.tags["sweep.overrides"].rsplit("model.hidden_dim=", 1)[1]
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert sorted(c.info.run_name for c in mine) == [f"float8-h{width}", f"mixed_bfloat16-h{width}"]
        assert all(c.info.status == "FINISHED" for c in mine) and parent.info.status == "FINISHED"
        for child in mine:
            assert [s for s, _ in history(client, child.info.run_id, "train/loss")] == [1]
