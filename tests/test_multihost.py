"""One run across several processes (JAX multi-controller), on this machine: two `python -m fp8exp`
processes on CPU, each with 2 virtual devices, meet at 127.0.0.1 and train one float8 model
data-parallel over all 4 devices (gloo collectives). What a user sees: a killed process ends the
run FAILED naming it, with a checkpoint; resumed on two processes, the one MLflow run (process
0's) finishes with the weights one process with 4 devices reaches; bad settings are one line.
One story (kill, resume) carries the end-to-end checks, to keep the processes few."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

# 8 steps of 32 rows (8 per device); a checkpoint every 4 steps, so one falls mid-run.
SAME = ["data=synthetic", "data.sequence_length=32", "data.num_train=256", "data.num_validation=64",
        "data.num_test=64", "data.vocabulary_size=500", "trainer.epochs=1", "trainer.batch_size=32",
        "trainer.checkpoint_every=4", "model.dropout=0", "precision=float8", "distribution=data_parallel",
        "tracking.fp8_probe=false", "tracking.fp8_whatif=false", "tracking.system_metrics=false",
        "tracking.log_every_steps=1"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(store: Path, *overrides: str, devices: int = 2, process_id: int | None = None, port: int | None = None,
          processes: int = 2, env: dict[str, str] | None = None, base: list[str] = SAME) -> subprocess.Popen:
    """One `python -m fp8exp` process logging to `store`; with `process_id`, one of `processes`."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    launch = [] if process_id is None else [f"distribution.coordinator=127.0.0.1:{port}",
                                            f"distribution.num_processes={processes}",
                                            f"distribution.process_id={process_id}", "distribution.timeout_s=90"]
    args = [*base, f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"tracking.artifact_root={store / 'artifacts'}",
            f"hydra.run.dir={store / 'hydra' / str(process_id)}", *launch, *overrides]
    return subprocess.Popen([sys.executable, "-m", "fp8exp", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def start_pair(store: Path, *overrides: str, base: list[str] = SAME) -> list[subprocess.Popen]:
    port = free_port()
    return [start(store, *overrides, process_id=index, port=port, base=base) for index in (0, 1)]


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out + err


def runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def final_weights(store: Path) -> list[np.ndarray]:
    """Every variable of the saved model (its .keras file's weights), in order."""
    import h5py

    (saved,) = store.glob("artifacts/models/*/artifacts/artifacts/model.keras")
    with zipfile.ZipFile(saved) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        arrays = []
        weights.visititems(lambda name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


@dataclass
class Story:
    """A 2-process run killed mid-way and resumed on 2, beside one process with 4 devices."""

    store: Path
    reference: Path
    killed: tuple[int, str]
    killed_run: object
    resumed: list[tuple[int, str]]


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Story:
    store, reference = tmp_path_factory.mktemp("pair"), tmp_path_factory.mktemp("single")
    alone = start(reference, "tracking.fp8_probe=true", "tracking.fp8_log_every=3", devices=4)  # probes: fsdp's reference
    first, second = start_pair(store)
    deadline = time.monotonic() + 240
    while not list(store.glob("artifacts/*/artifacts/checkpoints/last.npz")) and time.monotonic() < deadline:
        assert first.poll() is None and second.poll() is None, finish(first)[1][-2000:]
        time.sleep(0.05)
    second.send_signal(signal.SIGKILL)  # at its first checkpoint (step 4 of 8)
    killed = finish(first)
    finish(second)
    (killed_run,) = runs(store)
    resumed = [finish(process) for process in start_pair(store, "trainer.resume=true")]
    code, output = finish(alone)
    assert code == 0, output[-3000:]
    return Story(store, reference, killed, killed_run, resumed)


@pytest.mark.slow
def test_killing_one_process_ends_the_run_failed_naming_it_with_a_checkpoint(story):
    code, output = story.killed
    assert code == 1
    assert "fp8exp: error: process 1 of 2 failed: it exited without a word" in output
    assert story.killed_run.info.status == "FAILED"
    assert story.killed_run.data.tags["failure.process"] == "1"
    assert story.killed_run.data.tags["checkpoint.step"] == "4"


FAILING = """
import os
if os.environ.get("FP8EXP_TEST_FAILS"):  # this process alone fails as training starts
    import fp8exp.run.train as train

    def fit_and_evaluate(*args, **kwargs):
        raise RuntimeError("this host's disk is full")
    train.fit_and_evaluate = fit_and_evaluate
"""


@pytest.mark.slow
@pytest.mark.parametrize("count, failing", [(2, 0), (3, 1)])
def test_one_process_failing_alone_ends_the_run_failed_and_every_process_exits_cleanly(tmp_path, count, failing):
    """The failing process ends through JAX's shutdown barrier; the others (told by process 0: the
    others hear only from it) meet it there before they leave. Before, a failed process 0 waited
    there ~100 s (JAX's heartbeat timeout) and aborted; with 3, the ones not told aborted."""
    (tmp_path / "sitecustomize.py").write_text(FAILING)
    port, path = free_port(), f"{tmp_path}{os.pathsep}{ROOT}"
    launched = [start(tmp_path, "trainer.batch_size=24", process_id=index, port=port, processes=count,
                      env={"PYTHONPATH": path, **({"FP8EXP_TEST_FAILS": "1"} if index == failing else {})})
                for index in range(count)]
    results = [finish(process, timeout=150) for process in launched]
    for code, output in results:
        assert code == 1 and "Check failure" not in output and "Terminating process" not in output, output[-3000:]
    assert "RuntimeError: this host's disk is full" in results[failing][1]
    told = f"process {failing} of {count} failed: RuntimeError: this host's disk is full"
    for index in (i for i in range(count) if i != failing):
        assert f"fp8exp: error: {'process 0 of 3 failed: ' if index and count == 3 else ''}{told}; process {index} " \
               f"of {count} stops" in results[index][1], results[index][1][-2000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED" and "this host's disk is full" in run.data.tags["failure.error"]


@pytest.mark.slow
def test_resumed_on_two_processes_process_0_alone_finishes_the_one_mlflow_run(story):
    for code, output in story.resumed:
        assert code == 0, output[-3000:]
    (run,) = runs(story.store)
    assert run.info.run_id == story.killed_run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"
    assert run.data.params["distribution.num_processes"] == "2"
    assert run.data.params["distribution.process_id"] == "0"
    assert run.data.metrics["fp8/gemm/fp8_matmuls"] == 24  # the per-device program, as with one process
    assert "MLflow run" in story.resumed[0][1] and "MLflow run" not in story.resumed[1][1]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_reach_the_weights_of_one_process_with_all_the_devices(story):
    shared, alone = final_weights(story.store), final_weights(story.reference)
    assert len(shared) == len(alone) > 20
    for mine, theirs in zip(shared, alone):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def history(store: Path, key: str = "train/loss_step") -> dict[int, float]:
    """{step: value} of the store's one run's metric `key`."""
    from mlflow.tracking import MlflowClient

    (run,) = runs(store)
    return {m.step: m.value for m in MlflowClient(f"sqlite:///{store / 'mlflow.db'}").get_metric_history(run.info.run_id, key)}


def loss_curve(store: Path) -> list[float]:
    return [value for _, value in sorted(history(store).items())]


def last_checkpoint(store: Path):
    from fp8exp.run import checkpoint

    (path,) = store.glob("artifacts/*/artifacts/checkpoints/last.npz")
    return checkpoint.decode(path.read_bytes())


@pytest.mark.slow
def test_fsdp_over_two_processes_follows_the_unsharded_run_and_saves_probes_and_checkpoints_whole(story, tmp_path):
    """Weights and Adam moments split over both processes' devices: the loss curve and final weights
    are those of one process replicating the model; the checkpoint and the saved model read the
    weights whole, gathered from both processes; the FP8 probe computes with them split and
    measures at every log point what the replicated run measures."""
    results = [finish(process) for process in start_pair(tmp_path, "distribution=fsdp", "tracking.fp8_probe=true",
                                                         "tracking.fp8_log_every=3")]  # gathered mid-run too
    for code, output in results:
        assert code == 0, output[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert len(loss_curve(tmp_path)) == 8
    np.testing.assert_allclose(loss_curve(tmp_path), loss_curve(story.reference), rtol=1e-4)
    for mine, theirs in zip(final_weights(tmp_path), final_weights(story.reference), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    split, replicated = last_checkpoint(tmp_path), last_checkpoint(story.reference)
    assert split.step == replicated.step == 4 and split.arrays.keys() == replicated.arrays.keys()
    for key in (key for key in split.arrays if key.startswith(("trainable/", "optimizer/"))):
        np.testing.assert_allclose(split.arrays[key], replicated.arrays[key], rtol=1e-4, atol=1e-5, err_msg=key)
    probed = [key for key in run.data.metrics if key.startswith("fp8/") and key.endswith("_sqnr_db")]
    assert {key.rpartition("/")[2] for key in probed} >= {"inputs_sqnr_db", "kernel_sqnr_db", "outputs_grad_sqnr_db"}
    for key in probed:  # at steps 3, 6 and the end, 8
        mine, theirs = history(tmp_path, key), history(story.reference, key)
        assert sorted(mine) == sorted(theirs) == [3, 6, 8], key
        # Kernels (gathered one at a time) and the first layer's inputs are the replicated run's; deeper
        # activations and gradients come from matmuls split another way (the probe computes with the
        # split weights), and FP8 rounding of their few thousand elements amplifies the last bits.
        exact = "/kernel_" in key or "/query/inputs" in key
        np.testing.assert_allclose([mine[s] for s in sorted(mine)], [theirs[s] for s in sorted(theirs)],
                                   rtol=1e-4 if exact else 0, atol=0 if exact else 1.5, err_msg=key)
        for share in (key.replace("_sqnr_db", "_saturation"), key.replace("_sqnr_db", "_underflow")):
            np.testing.assert_allclose(sorted(history(tmp_path, share).items()),
                                       sorted(history(story.reference, share).items()), atol=1e-3, err_msg=share)
    (layers,) = tmp_path.glob("artifacts/*/artifacts/fp8/layers.md")
    assert "| sharded (None, None, 'batch') |" in layers.read_text()  # as the weights lay while training, not gathered


@pytest.mark.slow
def test_a_language_model_split_over_two_processes_trains_probes_and_is_saved_by_process_0(tmp_path):
    """task=causal_lm, llama_tiny, model_parallel with the model axis across both processes (mesh
    [1, 4]): both processes build the BPE cache in one shared cache_dir (as on a shared file
    system); the FP8 probe measures with the kernels split; process 0 saves the CausalLM, which
    keras-hub compiles anew: with the run's distribution still set, its new optimizer variables
    were a collective only process 0 entered."""
    import pandas as pd

    from tests.test_bpe import DOCUMENTS

    table = tmp_path / "reviews.jsonl"
    pd.DataFrame({"text": DOCUMENTS, "label": [i % 2 for i in range(len(DOCUMENTS))]}).to_json(table, orient="records",
                                                                                       lines=True)
    lm = ["data=table", f"data.path={table}", f"data.cache_dir={tmp_path / 'cache'}", "data.vocabulary_size=300",
          "data.sequence_length=16", "task=causal_lm", "model=llama_tiny", "model.num_key_value_heads=4",
          "trainer.epochs=1", "trainer.batch_size=8", "trainer.steps_per_epoch=4", "precision=float8",
          "distribution=model_parallel", "distribution.mesh_shape=[1,4]", "tracking.fp8_whatif=false",
          "tracking.system_metrics=false"]
    for code, output in [finish(process) for process in start_pair(tmp_path, base=lm)]:
        assert code == 0, output[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and "test/perplexity" in run.data.metrics
    probed = {key.rpartition("/")[2] for key in run.data.metrics if key.startswith("fp8/")}
    assert {"inputs_sqnr_db", "kernel_sqnr_db", "outputs_grad_sqnr_db"} <= probed
    (layers,) = tmp_path.glob("artifacts/*/artifacts/fp8/layers.md")
    assert "| sharded (None, 'model') |" in layers.read_text()  # the feed-forward kernels, across processes
    assert list(tmp_path.glob("artifacts/models/*/artifacts/artifacts/model.keras"))


@pytest.mark.slow
def test_sigterm_to_every_process_checkpoints_and_ends_the_run_killed_not_failed(tmp_path):
    """A preemption or scancel: fp8exp's signal handlers, not JAX's preemption service, get SIGTERM;
    each process stops at a step boundary and a peer's stop is no failure."""
    pair = start_pair(tmp_path, "trainer.checkpoint_every=2", "data.num_train=1024")
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("artifacts/*/artifacts/checkpoints/last.npz")) and time.monotonic() < deadline:
        assert all(process.poll() is None for process in pair), finish(pair[0])[1][-2000:]
        time.sleep(0.05)
    for process in pair:
        process.send_signal(signal.SIGTERM)
    (code, output), _ = [finish(process) for process in pair]
    (run,) = runs(tmp_path)
    assert code == 143, output[-3000:]
    assert run.info.status == "KILLED" and "failure.process" not in run.data.tags
    assert "killed.process" not in run.data.tags  # each stopped itself: none was stopped by another's stop
    assert int(run.data.tags["checkpoint.step"]) < 1024 // 32  # stopped before the end, with a checkpoint


def one_line_error(process: subprocess.Popen) -> str:
    code, output = finish(process, timeout=120)
    errors = [line for line in output.splitlines() if line.startswith("fp8exp: error:")]
    assert code == 2 and len(errors) == 1, output[-3000:]
    return errors[0]


def test_a_process_id_out_of_range_is_one_line(tmp_path):
    line = one_line_error(start(tmp_path, process_id=2, port=free_port()))
    assert line == "fp8exp: error: distribution.process_id: got 2, expected 0 .. 1 (distribution.num_processes=2)"


def test_an_unreachable_coordinator_is_one_line_naming_it_after_a_bounded_wait(tmp_path):
    port = free_port()
    line = one_line_error(start(tmp_path, "distribution.timeout_s=3", process_id=1, port=port))
    assert line.startswith(f"fp8exp: error: distribution.coordinator: no process 0 answered at 127.0.0.1:{port} "
                           "within 3 s")
    assert not (tmp_path / "mlflow.db").exists()


def test_process_0_failing_its_own_checks_tells_the_others_the_same_line_not_a_timeout(tmp_path):
    """Process 0 alone reads MLflow before the meeting (the run to resume): the process waiting to
    meet hears its error at once, rather than "no process 0 answered" after distribution.timeout_s."""
    port = free_port()
    pair = [start(tmp_path, "trainer.resume_from=0123456789abcdef", process_id=index, port=port) for index in (0, 1)]
    lines = [one_line_error(process) for process in pair]
    assert lines[0].startswith("fp8exp: error: trainer.resume_from: no run 0123456789abcdef in sqlite:///")
    assert lines[1] == lines[0]


def test_a_device_count_with_several_processes_is_one_line_whether_set_or_detected(tmp_path):
    """Set in the config, the check fails before JAX starts; detected from the cluster (here
    submitit's environment, as SLURM's), before the meeting, on every process."""
    expected = ("fp8exp: error: distribution.devices: got 2, but 2 processes train on every device of every process; "
                "leave it null")
    assert one_line_error(start(tmp_path, "distribution.devices=2", process_id=0, port=free_port())).startswith(expected)
    cluster = {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "1", "JAX_COORDINATOR_PORT": str(free_port())}
    for index in (0, 1):
        detected = start(tmp_path, "distribution.devices=2", env={**cluster, "SUBMITIT_LOCAL_GLOBALID": str(index)})
        assert one_line_error(detected).startswith(expected)


def test_a_batch_that_does_not_split_over_every_device_of_every_process_is_one_line_on_each(tmp_path):
    port = free_port()
    pair = [start(tmp_path, "trainer.batch_size=30", process_id=index, port=port) for index in (0, 1)]
    for line in [one_line_error(process) for process in pair]:
        assert line == ("fp8exp: error: trainer.batch_size: 30 does not split evenly over the 4 devices of the batch "
                        "axis of 2 processes; use a multiple of 4")


@pytest.mark.parametrize("settings, cluster", [
    (["distribution.coordinator=127.0.0.1:1", "distribution.num_processes=2", "distribution.process_id=0"], {}),
    ([], {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_JOB_ID": "1"})],
    ids=["set", "detected"])
def test_a_sweep_over_several_processes_without_a_launcher_that_starts_them_is_one_line(tmp_path, settings, cluster):
    """The basic launcher would run every job in each process: a parent run per process, and JAX's
    runtime started again for the second job. Processes set in the config or found in the cluster's
    environment (here submitit's, as SLURM's under `srun python -m fp8exp -m ...`)."""
    result = subprocess.run([sys.executable, "-m", "fp8exp", "-m", *SAME, "trainer.seed=0,1", *settings,
                             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            cwd=ROOT, env={**os.environ, **cluster}, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fp8exp: error:")]
    assert result.returncode == 2 and errors == [
        "fp8exp: error: distribution.num_processes: a sweep whose jobs run over several processes (set, or the "
        "cluster's tasks) needs a launcher that starts them (hydra/launcher=slurm or submitit_local with "
        "hydra.launcher.tasks_per_node), not hydra/launcher=basic; or run each job as its own command on every "
        "process, or set distribution.num_processes=1"], result.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_processes_with_different_configs_are_one_line_each(tmp_path):
    port = free_port()
    processes = [start(tmp_path, f"trainer.learning_rate={rate}", process_id=index, port=port)
                 for index, rate in ((0, 0.001), (1, 0.002))]
    lines = [one_line_error(process) for process in processes]
    for line in lines:
        assert line.startswith("fp8exp: error: distribution: process 1 runs another config than process 0: "
                               "trainer.learning_rate=0.002 (process 0: 0.001)")


@pytest.mark.slow
def test_a_submitit_local_job_with_two_tasks_is_one_run_over_both(tmp_path):
    """hydra/launcher=submitit_local hydra.launcher.tasks_per_node=2: the job's two tasks find each
    other from submitit's environment (as SLURM's tasks do from SLURM's), one child run on 4 devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", *SAME, "tracking.fp8_gemm_check=false",
            "tracking.save_model=false", "trainer.checkpoint_every=null",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'artifacts'}"]
    result = subprocess.run([sys.executable, "-m", "fp8exp", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    child = [run for run in runs(tmp_path) if "mlflow.parentRunId" in run.data.tags]
    assert len(child) == 1 and child[0].info.status == "FINISHED"
    assert child[0].data.tags["device"].endswith("x4")  # each task has 2: the run spans both


def test_the_cluster_sets_the_processes_unless_the_config_does(monkeypatch):
    from fp8exp.run.processes import detect
    from tests.conftest import compose_config

    slurm = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "16",
             "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    found = detect(compose_config("distribution=data_parallel").distribution)
    assert (found.index, found.count, found.coordinator.split(":")[0], found.local_devices) == (9, 16, "node001", [1])
    assert detect(compose_config("distribution.num_processes=1").distribution).count == 1  # opted out
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detect(compose_config("distribution=data_parallel").distribution).count == 1


def test_the_meeting_hands_out_the_payload_over_connections_kept_alive_for_the_watch():
    """In one process (threads): process 0 and process 1 meet on 127.0.0.1; the connections they
    keep probe a silent peer (TCP keepalive), so a host that dies unannounced is noticed."""
    import threading

    from fp8exp.run import meeting

    coordinator = f"127.0.0.1:{free_port()}"
    listener, joined = meeting.listen(coordinator), {}
    peer = threading.Thread(target=lambda: joined.update(result=meeting.join(coordinator, 1, {"seed": "0"}, 10)))
    peer.start()
    peers = meeting.lead(listener, coordinator, 2, {"seed": "0"}, b"checkpoint", 10)
    peer.join()
    to_lead, payload = joined["result"]
    assert payload == b"checkpoint" and list(peers) == [1]
    for conn in (to_lead, peers[1]):
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        idle = getattr(socket, "TCP_KEEPIDLE", None) or socket.TCP_KEEPALIVE  # Linux, else macOS
        assert conn.getsockopt(socket.IPPROTO_TCP, idle) == meeting.KEEPALIVE[0]
        conn.close()


def test_a_process_0_that_never_answers_is_one_line_after_a_bounded_wait(monkeypatch):
    """Process 0 accepted the connection, then hangs (stuck in its checks, or waiting for a
    process that never comes): the others stop after 2 x timeout_s + ANSWER_MARGIN_S, naming it."""
    import threading

    from fp8exp.config import ConfigError
    from fp8exp.run import meeting

    monkeypatch.setattr(meeting, "ANSWER_MARGIN_S", 0.5)
    coordinator = f"127.0.0.1:{free_port()}"
    listener, held = meeting.listen(coordinator), []
    listener.settimeout(30)
    silent = threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True)  # answers nothing
    silent.start()
    with pytest.raises(ConfigError) as error:
        meeting.join(coordinator, 1, {"seed": "0"}, 0.5)
    silent.join(timeout=30)
    held[0].close()
    listener.close()
    assert str(error.value) == (f"distribution.coordinator: process 0 at {coordinator} did not answer within 2 s of "
                                "this process connecting (still checking, or waiting for the others): see its output")


WATCHED = """
import socket, sys, time
from fp8exp.run import meeting, processes
mine, theirs = socket.socketpair()
here = processes.Processes(0, 2, "127.0.0.1:1", peers={1: mine})
processes.STOPPED_GRACE_S = 0.5
def on_failure(index, why, status):
    print("run ended", status, file=sys.stderr, flush=True)
    raise RuntimeError("the store is gone")
here.on_failure = on_failure
processes.watch(here)
if sys.argv[1] == "dies":
    theirs.close()
else:
    meeting.send(theirs, {"done": True, "stopped": "Interrupted: SIGTERM"})
time.sleep(60)  # stuck, as in a collective the other process left
"""


@pytest.mark.parametrize("peer, code, line, status", [
    ("dies", 1, "process 1 of 2 failed: it exited without a word (killed, out of memory, or its host lost)", "FAILED"),
    ("stops", 143, "process 1 of 2 stopped: it stopped (Interrupted: SIGTERM) and this one had not", "KILLED")])
def test_a_process_left_waiting_by_its_peer_ends_its_run_and_exits_even_if_the_run_cannot_end(peer, code, line,
                                                                                              status):
    """processes.watch in process 0, stuck (here in a sleep): its peer dies without a word, or stops
    at a signal while this one does not stop within STOPPED_GRACE_S. The run is ended (here that
    fails: the store is gone) and the process exits all the same, naming the peer."""
    result = subprocess.run([sys.executable, "-c", WATCHED, peer], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert f"run ended {status}" in result.stderr and "could not end the run after process 1 of 2" in result.stderr
    assert f"fp8exp: error: {line}; process 0 of 2 stops" in result.stderr


SAME_ERROR = """
import socket, sys, time
from fp8exp.config import ConfigError
from fp8exp.run import meeting, processes
mine, theirs = socket.socketpair()
here = processes.Processes(1, 2, "127.0.0.1:1", peers={0: mine})
processes.SAME_ERROR_GRACE_S = 4.0
processes.watch(here)
error = ConfigError("trainer.batch_size", "30 does not split evenly")
meeting.send(theirs, processes._failure(error))  # process 0 reached the check first
time.sleep(float(sys.argv[1]))  # this one reaches it after this long...
if sys.argv[2] == "fails":  # ...or fails otherwise (a collective the peer left) and settles
    processes.settle(here)
    sys.exit(3)
processes.end(here, error)
print("fp8exp: error:", error, file=sys.stderr)
sys.exit(2)
"""
NAMED = ("fp8exp: error: process 0 of 2 failed: ConfigError: trainer.batch_size: 30 does not split evenly; "
         "process 1 of 2 stops")


@pytest.mark.parametrize("late_s, then, code, line", [
    (0.5, "same", 2, "fp8exp: error: trainer.batch_size: 30 does not split evenly"),
    (30, "same", 1, NAMED), (0.5, "fails", 1, NAMED)])
def test_a_config_error_of_every_process_is_each_ones_own_line_unless_one_is_late(late_s, then, code, line):
    """After the meeting all processes check the same settings: the one that reaches a config error
    a moment after a peer reports its own (and exits normally, with JAX's shutdown, not cut off by
    its watcher); one that does not reach it within SAME_ERROR_GRACE_S, or fails another way
    meanwhile, exits naming the peer."""
    result = subprocess.run([sys.executable, "-c", SAME_ERROR, str(late_s), then], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == line


def test_a_large_checkpoint_arrives_whole_through_the_start_up_connection():
    import threading

    from fp8exp.run.meeting import receive, send

    payload = np.random.default_rng(0).bytes(48 << 20)  # 48 MiB: quadratic appends took a minute
    left, right = socket.socketpair()
    sender = threading.Thread(target=send, args=(left, {"ok": True}, payload))
    sender.start()
    message, received = receive(right)
    sender.join()
    left.close(), right.close()
    assert message == {"ok": True, "payload": len(payload)} and received == payload
