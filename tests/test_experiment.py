"""End to end, in process: one run per precision on synthetic data, judged by what MLflow holds."""

import math

import pytest
from mlflow.tracking import MlflowClient

from fp8exp.config import PRECISIONS, validate
from fp8exp.run import train
from fp8exp.run.experiment import run_experiment
from tests.conftest import tracked
from tests.test_precision import EXPECTED_TINY_FP8_LAYERS

EPOCH_METRICS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy"]
FINAL_METRICS = ["test/loss", "test/accuracy", "perf/step_time_ms", "perf/step_time_p90_ms",
                 "perf/examples_per_s", "perf/tokens_per_s", "perf/compile_s", "perf/peak_rss_mb",
                 "model/params"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(store):
    """Train each precision once; the tests below read the store."""
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    outcomes = {}
    for name in PRECISIONS:
        cfg = tracked(store, f"precision={name}", "tracking.fp8_log_every=8")
        validate(cfg)
        outcomes[name] = run_experiment(cfg)
    return client, outcomes


@pytest.mark.parametrize("name", PRECISIONS)
def test_run_finishes_with_params_tags_and_metrics(runs, name):
    client, outcomes = runs
    run = client.get_run(outcomes[name].run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{name}-h32"
    params = run.data.params
    assert params["precision.name"] == name
    assert params["model.hidden_dim"] == "32"
    assert params["trainer.epochs"] == "2"
    assert params["data.sequence_length"] == "32"
    tags = run.data.tags
    assert tags["precision"] == name and tags["model"] == "tiny" and tags["backend"] == "jax"
    assert {"version.keras", "version.keras-hub", "version.jax", "device"} <= set(tags)
    for key in FINAL_METRICS:
        assert math.isfinite(run.data.metrics[key]), key
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]


@pytest.mark.parametrize("name", PRECISIONS)
def test_run_learns_the_synthetic_task(runs, name):
    client, outcomes = runs
    assert client.get_run(outcomes[name].run_id).data.metrics["test/accuracy"] > 0.7


def test_params_count_excludes_fp8_bookkeeping(runs):
    client, outcomes = runs
    counts = {name: client.get_run(o.run_id).data.metrics["model/params"] for name, o in outcomes.items()}
    assert len(set(counts.values())) == 1, counts


def test_float8_logs_scale_and_amax_for_every_quantized_layer(runs):
    client, outcomes = runs
    run_id = outcomes["float8"].run_id
    metrics = client.get_run(run_id).data.metrics
    for layer in EXPECTED_TINY_FP8_LAYERS:
        for tensor in ("inputs", "kernel", "outputs_grad"):
            assert f"fp8/{layer}/{tensor}_scale" in metrics
            assert f"fp8/{layer}/{tensor}_amax" in metrics
    scales = {k: v for k, v in metrics.items() if k.endswith("_scale")}
    assert any(value != 1.0 for value in scales.values()), "no FP8 scale moved from its initial 1.0"
    # Logged every 8 optimizer steps and at the end: 512/32 = 16 steps per epoch, 2 epochs. Each
    # scale is logged at the step that quantizes with it, the one after it was computed.
    assert [m.step for m in client.get_metric_history(run_id, "fp8/head/kernel_amax")] == [8, 16, 24, 32]
    assert [m.step for m in client.get_metric_history(run_id, "fp8/head/kernel_scale")] == [9, 17, 25, 33]


@pytest.mark.slow
def test_each_fp8_scale_is_logged_at_the_step_that_used_it(store):
    """With a one-step history, the scale step k quantizes with is the amax of step k-2 over the
    format's max: Keras computes it at step k-1 from the history before that step's amax."""
    cfg = tracked(store, "precision=float8", "precision.amax_history_length=1", "trainer.epochs=1",
                  "trainer.steps_per_epoch=6", "tracking.fp8_log_every=1", "tracking.fp8_probe=false",
                  "tracking.fp8_gemm_check=false", "tracking.save_model=false", "tracking.experiment=scale-steps")
    run_id = run_experiment(cfg).run_id
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    for tensor, fp8_max in (("inputs", 448.0), ("kernel", 448.0), ("outputs_grad", 57344.0)):
        scale = {m.step: m.value for m in client.get_metric_history(run_id, f"fp8/dense/{tensor}_scale")}
        amax = {m.step: m.value for m in client.get_metric_history(run_id, f"fp8/dense/{tensor}_amax")}
        assert sorted(scale) == [2, 3, 4, 5, 6, 7] and sorted(amax) == [1, 2, 3, 4, 5, 6]
        for step in range(3, 8):
            assert scale[step] * fp8_max == pytest.approx(amax[step - 2], rel=1e-5), (tensor, step)


def test_float8_run_records_gemm_verdict_health_and_layer_table(runs):
    client, outcomes = runs
    run = client.get_run(outcomes["float8"].run_id)
    assert run.data.tags["fp8.gemm"] == "emulated"
    assert run.data.metrics["fp8/gemm/fp8_matmuls"] == 24 and run.data.metrics["fp8/gemm/fused"] == 0
    assert run.data.metrics["perf/fp8_gemm_check_s"] > 0
    health = {k: v for k, v in run.data.tags.items() if k.startswith("fp8.health")}
    assert health == {"fp8.health": "ok"}  # a healthy run stays silent
    assert run.data.metrics["perf/fp8_probe_s"] > 0
    for layer in EXPECTED_TINY_FP8_LAYERS:
        for name in ("inputs_saturation", "inputs_underflow", "inputs_sqnr_db", "kernel_sqnr_db",
                     "outputs_grad_saturation", "outputs_grad_sqnr_db"):
            assert f"fp8/{layer}/{name}" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "fp8")]
    assert sorted(artifacts) == ["fp8/layers.md", "fp8/train_step_hlo.txt", "fp8/whatif"]


@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_other_precisions_log_no_fp8_state(runs, name):
    client, outcomes = runs
    assert not [k for k in client.get_run(outcomes[name].run_id).data.metrics if k.startswith("fp8/")]


def test_a_failure_mid_run_leaves_the_run_failed(store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(train, "fit_and_evaluate", broken)
    cfg = tracked(store, "tracking.experiment=failures")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("failures")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"


def test_tracking_none_trains_without_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tracked(tmp_path, "tracking=none", "trainer.epochs=1")
    outcome = run_experiment(cfg)
    assert outcome.run_id is None
    assert 0.0 <= outcome.metrics["test/accuracy"] <= 1.0
    assert not (tmp_path / "mlflow.db").exists()
    assert "test accuracy" in capsys.readouterr().out


def test_step_timer_skips_compilation_and_disturbed_steps():
    timer = train.StepTimer()
    timer.calls = [train.Call(step, steps, seconds, compiled) for step, steps, seconds, compiled in [
        (1, 1, 5.0, True), (2, 1, 0.010, False), (3, 1, 0.020, False), (4, 1, 0.900, False), (5, 1, 0.030, False),
        (7, 2, 0.080, False), (8, 1, 2.0, True)]]
    # Calls 1 and 8 compiled; step 3 was a log point, so calls ending at 3 and 4 are left out.
    assert list(timer.step_times(disturbed_steps=[3])) == [0.010, 0.030, 0.040]
    assert timer.compile_seconds == 7.0
