"""`python -m fp8exp.infer_bench`: latency at each batch size and the accuracy of every way of
running a model (as trained, INT8 and FP8 post-training quantization) land on the runs and in a
Markdown table, and the sweep report shows that table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from fp8exp.precision import policy as precision
from fp8exp.report import inference as report_inference
from fp8exp.report import rows as report_rows
from fp8exp.report import runs as report_runs
from fp8exp.report.__main__ import main as report_main
from fp8exp.serve import bench as infer_bench
from fp8exp.serve import ptq
from tests.test_predict import model_dir, model_id, text_runs, uri
from tests.test_report import log_sweep


@pytest.fixture(scope="module")
def benched(store, tmp_path_factory):
    """Both text runs benchmarked in process (short timing, few calibration examples)."""
    runs = text_runs(store)
    out = tmp_path_factory.mktemp("inference")
    code = infer_bench.main([f"run_id={runs['mixed_bfloat16']}", f"run_id={runs['float8']}",
                             f"tracking.uri={uri(store)}", f"out={out}", "seconds=0.05", "calibration_examples=64"])
    assert code == 0
    return runs, out


@pytest.mark.slow
def test_latency_throughput_and_accuracies_land_on_each_run(store, benched, capsys):
    runs, out = benched
    client = MlflowClient(uri(store))
    bf16, fp8 = (client.get_run(runs[name]).data for name in ("mixed_bfloat16", "float8"))
    for data in (bf16, fp8):
        for size in (1, 32, 256):
            assert data.metrics[f"infer/latency_ms_b{size}"] > 0
            assert data.metrics[f"infer/examples_per_s_b{size}"] == pytest.approx(
                size / data.metrics[f"infer/latency_ms_b{size}"] * 1e3)
        # The reloaded model scores exactly what the trained one did on the same test split.
        assert data.metrics["infer/as_trained/accuracy"] == pytest.approx(data.metrics["test/accuracy"], abs=1e-6)
        assert data.tags["infer.device"].startswith("cpu")
    for variant in report_inference.PTQ_VARIANTS:
        assert 0.0 <= bf16.metrics[f"infer/{variant}/accuracy"] <= 1.0
        assert f"infer/{variant}/accuracy" not in fp8.metrics  # FP8-trained: nothing to quantize after the fact

    table = (out / "inference.md").read_text()
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()
             if line.startswith("| ") and "configuration" not in line]
    assert [row[:2] for row in cells] == [["mixed_bfloat16 h32", report_inference.VARIANT_LABELS[v]] for v in (
        "as_trained", *report_inference.PTQ_VARIANTS)] + [["float8 h32", "as trained"]]
    assert cells[1][3] == f"{bf16.metrics['infer/int8_ptq/accuracy']:.4f}"
    assert "ms/batch b=256" in table and "examples/s b=256" in table
    for run_id in runs.values():
        assert [a.path for a in client.list_artifacts(run_id, "infer")] == ["infer/inference.md"]


@pytest.mark.slow
def test_int8_path_quantizes_every_dense_layer_to_int8(store):
    runs = text_runs(store)
    classifier = ptq.variant(model_dir(store, runs["mixed_bfloat16"]), "int8_ptq")
    layers = precision.quantizable_layers(classifier.model)
    assert len(layers) == 8
    assert {layer.dtype_policy.name for layer in layers} == {"int8_from_mixed_bfloat16"}
    assert {layer.dtype_policy.quantization_mode for layer in layers} == {"int8"}
    assert classifier.classify(["a wonderful film"]).labels[0] in ("neg", "pos")


@pytest.mark.slow
def test_calibration_sets_fp8_scales_from_the_data(store):
    from fp8exp.precision.scales import scale_variables

    directory = model_dir(store, text_runs(store)["mixed_bfloat16"])
    vocabulary = len((directory / "artifacts" / "vocabulary.txt").read_text().splitlines())
    x = np.random.default_rng(0).integers(2, vocabulary, (64, 16)).astype(np.int32)
    classifier = ptq.variant(directory, "fp8_ptq_calibrated", x)
    layers = {layer.path: layer for layer in classifier.model._flatten_layers()}
    for entry in scale_variables(classifier.model):
        scale = float(np.asarray(entry.scale.value))
        if entry.tensor == "kernel":
            kernel = np.asarray(layers[entry.layer].kernel, np.float32)
            assert scale == pytest.approx(np.abs(kernel).max() / 448, rel=1e-6), entry.layer
        elif entry.tensor == "inputs":
            assert scale != 1.0 and math.isfinite(scale), entry.layer


@pytest.mark.slow
def test_bad_runs_are_one_line_and_exit_2(store, capsys):
    client = MlflowClient(uri(store))
    bare = client.create_run(client.get_experiment_by_name("inference-tests").experiment_id).info.run_id
    client.set_terminated(bare)
    for run_id, message in (("0123456789abcdef0123456789abcdef", "no run '0123456789abcdef0123456789abcdef'"),
                            (bare, "has no saved model")):
        assert infer_bench.main([f"run_id={run_id}", f"tracking.uri={uri(store)}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fp8exp.infer_bench: error: ") and message in err and "\n" not in err, err
    assert infer_bench.main(["batch_sizes=1,zero"]) == 2
    assert capsys.readouterr().err.strip() == "fp8exp.infer_bench: error: batch_sizes: got 'zero', expected a number"


@pytest.mark.slow
def test_a_logged_model_is_benchmarked_by_its_id_and_the_results_land_on_it_too(store, tmp_path):
    runs = text_runs(store)
    client = MlflowClient(uri(store))
    fp8_model = model_id(store, runs["float8"])
    assert infer_bench.main([f"model_id={fp8_model}", f"tracking.uri={uri(store)}", f"out={tmp_path}",
                             "seconds=0.05", "batch_sizes=1"]) == 0
    on_model = {metric.key: metric.value for metric in client.get_logged_model(fp8_model).metrics}
    on_run = client.get_run(runs["float8"]).data.metrics
    assert on_model["infer/as_trained/accuracy"] == on_run["infer/as_trained/accuracy"] == \
        pytest.approx(on_run["test/accuracy"], abs=1e-6)
    assert on_model["infer/latency_ms_b1"] == on_run["infer/latency_ms_b1"] > 0
    assert "float8 h32" in (tmp_path / "inference.md").read_text()


def test_the_report_shows_the_inference_table_when_a_sweep_has_it(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    specs = [{"precision": p, "hidden": "32", "seed": s, "test/accuracy": 0.8, "perf/step_time_ms": 5.0}
             for p in ("mixed_bfloat16", "float8") for s in (0, 1)]
    parent = log_sweep(store, specs)
    client = MlflowClient(store)
    assert not report_inference.has_inference(report_rows.build_rows(report_runs.find_source(client, parent, None).runs))

    for run in client.search_runs([client.get_experiment_by_name("fp8exp").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'"):
        bf16 = run.data.params["precision.name"] == "mixed_bfloat16"
        seed = int(run.data.params["trainer.seed"])
        values = {"infer/as_trained/accuracy": (0.80 if bf16 else 0.79) + 0.01 * seed,
                  "infer/latency_ms_b1": 1.0, "infer/examples_per_s_b1": 1000.0}
        if bf16:
            values.update({"infer/int8_ptq/accuracy": 0.78 + 0.01 * seed, "infer/fp8_ptq/accuracy": 0.70,
                           "infer/fp8_ptq_calibrated/accuracy": 0.79})
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])
    assert report_main(["--tracking-uri", store, "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    section = markdown.split("## Inference", 1)[1]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:6]) for line in section.splitlines()
            if line.startswith("| ") and "configuration" not in line}
    assert ("mixed_bfloat16 h32", "as trained", "2", "0.8050", "–") in rows
    assert ("mixed_bfloat16 h32", "INT8 post-training quantization", "2", "0.7850", "-2.00 pts") in rows
    assert ("float8 h32", "as trained", "2", "0.7950", "-1.00 pts") in rows
