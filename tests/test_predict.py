"""Saved models: every run keeps its model as an MLflow LoggedModel (Models tab, `models:/<model_id>`,
registered on request; the run's plain artifact `model/` offline or while the server is away, and for
older runs), it reloads bit for bit (FP8 scales included), `python -m fp8exp.predict` classifies texts
from a file and stdin, bad input is one clear line, and `mlflow models serve` answers on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fp8exp.config import PRECISIONS, validate
from fp8exp.serve import locate, logged, predict
from fp8exp.serve import textmodel as serving
from fp8exp.serve import meta as serve_meta
from fp8exp.serve import save as serving_save
from tests.conftest import ROOT, compose_config
from tests.servers import model_server, tracking_server
from tests.test_data import write_table

EXPERIMENT = "inference-tests"
TEXTS = ["a wonderful film with great acting, loved it", "an awful film with terrible acting, hated it"]
LONG = " ".join(["a moving story"] * 12)  # 36 words: beyond the models' 16 tokens

_cache: dict = {}


def text_runs(store: Path) -> dict[str, str]:
    """precision -> run id: a mixed_bfloat16 and a float8 run on a small table of reviews, each
    saving its model (the default). Trained once per session; tests/test_infer_bench.py uses them too."""
    if "runs" not in _cache:
        from fp8exp.run.experiment import run_experiment

        table = write_table(store / "inference_reviews.csv", rows=320, classes=("neg", "pos"))
        runs = {}
        for precision in ("mixed_bfloat16", "float8"):
            cfg = compose_config(
                "data=table", f"data.path={table}", "data.text_column=body", "data.label_column=sentiment",
                f"data.cache_dir={store / 'cache'}", "data.vocabulary_size=200", "data.sequence_length=16",
                f"precision={precision}", "trainer.epochs=2", f"tracking.uri={uri(store)}",
                f"tracking.artifact_root={store / 'artifacts'}", f"tracking.experiment={EXPERIMENT}",
                "tracking.fp8_probe=false")
            validate(cfg)
            runs[precision] = run_experiment(cfg).run_id
        _cache["runs"] = runs
    return _cache["runs"]


def uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def model_dir(store: Path, run_id: str) -> Path:
    """The run's saved model directory in the local store (its LoggedModel's, or its artifact model/)."""
    return locate.locate(run_id, uri(store), store).directory


def model_id(store: Path, run_id: str) -> str:
    return locate.locate(run_id, uri(store), store).model_id


@pytest.fixture(scope="module")
def runs(store):
    return text_runs(store)


# ---------------------------------------------------------------- saving and reloading


@pytest.mark.slow
def test_every_run_saves_a_self_contained_model(store, runs):
    client = MlflowClient(uri(store))
    for precision, run_id in runs.items():
        # (Not client.list_artifacts(run_id, "model"): MLflow 3.17 looks the run's LoggedModel up through
        # the global tracking URI there, not the client's; mlflow/mlflow#18313.)
        saved = model_id(store, run_id)
        listed = {a.path for a in client.list_logged_model_artifacts(saved, "artifacts")}
        assert listed == {f"artifacts/{name}" for name in ("model.keras", "fp8exp_model.json", "vocabulary.txt")}
        assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(saved)}
        meta = json.loads((model_dir(store, run_id) / "artifacts" / "fp8exp_model.json").read_text())
        assert meta["precision"] == precision and meta["input"] == "text" and meta["run_id"] == run_id
        assert meta["class_names"] == ["neg", "pos"] and meta["sequence_length"] == 16 and meta["lowercase"]
        assert len(meta["quantized_layers"]) == (8 if precision == "float8" else 0)
        # The run's vocabulary and the model's are the same file.
        logged = client.download_artifacts(run_id, "vocabulary.txt", str(store / f"vocab-{precision}"))
        assert Path(logged).read_text().split() == \
            (model_dir(store, run_id) / "artifacts" / "vocabulary.txt").read_text().split()


def test_the_large_sweep_does_not_save_models_and_runs_do_by_default():
    assert compose_config().tracking.save_model is True
    assert compose_config("+sweep=fp8_crossover").tracking.save_model is False
    assert compose_config().tracking.register_model is None


@pytest.mark.slow
def test_each_run_s_model_is_a_logged_model_with_its_test_metrics(store, runs):
    """What the experiment's Models tab and the runs table's Models column show."""
    client = MlflowClient(uri(store))
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    models = {m.source_run_id: m for m in client.search_logged_models(experiment_ids=[experiment])}
    for precision, run_id in runs.items():
        model, run = models[run_id], client.get_run(run_id)
        assert model.name == "model" and str(model.status) == "READY"
        assert model.model_type == logged.MODEL_TYPES["classify"]
        assert model.model_id == model_id(store, run_id)
        assert [output.model_id for output in run.outputs.model_outputs] == [model.model_id]
        assert model.tags["precision"] == precision and model.params["precision.name"] == precision
        assert model.tags["fp8exp.quantized_layers"] == ("8" if precision == "float8" else "0")
        attached = {metric.key: metric for metric in model.metrics}
        for key in ("test/accuracy", "test/loss", "perf/step_time_ms"):
            assert attached[key].value == run.data.metrics[key] and attached[key].run_id == run_id, key
        # The same points as the run's, not new ones: its history is unchanged.
        assert len(client.get_metric_history(run_id, "test/accuracy")) == 1
        # The files are the LoggedModel's, not a second copy among the run's own artifacts.
        assert not (Path(run.info.artifact_uri.removeprefix("file://")) / "model").exists()
    best = client.search_logged_models(experiment_ids=[experiment], filter_string="metrics.`test/accuracy` >= 0")
    assert set(runs.values()) <= {m.source_run_id for m in best}


# ---------------------------------------------------------------- log_model without training

SPLITS = SimpleNamespace(class_names=["a", "b"], sequence_length=16, vocabulary_size=100, vocabulary=None, merges=None,
                         task="classify", tokenizer=None, end_of_text_id=None)
IDS = ["5 17 33", "1 2 3 4"]


@pytest.fixture(scope="module")
def tiny_net():
    return trained_model("float32")


def start_run(client, tracking_uri: str, artifacts: Path | None = None):
    """A run as open_run makes it, with its final test metrics logged."""
    from fp8exp.tracking.offline import Journal
    from fp8exp.tracking.run import MlflowRun

    experiment = client.get_experiment_by_name("models")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "models", artifact_location=str(artifacts) if artifacts else None)
    created = client.create_run(experiment_id, run_name="tiny")
    run = MlflowRun(client, created.info.run_id, tracking_uri, Journal("models", "tiny", created.info.start_time),
                    created.info.artifact_uri)
    run.log_params({"precision.name": "float32"})
    run.log_metrics({"test/accuracy": 0.5, "test/loss": 0.7}, step=4)
    return run


def tiny_config(tmp_path: Path, tracking_uri: str, *overrides: str):
    return compose_config("data=synthetic", "precision=float32", f"tracking.uri={tracking_uri}",
                          f"tracking.offline_uri=sqlite:///{tmp_path / 'offline.db'}", *overrides)


def predicted(tracking_uri: str, key: str) -> list[str]:
    out = io.StringIO()
    assert predict.main([key, *(f"text={text}" for text in IDS), f"tracking.uri={tracking_uri}"], out=out) == 0
    return out.getvalue().splitlines()


def test_register_model_adds_a_version_tagged_with_the_precision(tmp_path, tiny_net):
    import mlflow.pyfunc
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(local)
    cfg = tiny_config(tmp_path, local, "tracking.register_model=fp8exp-tiny")
    ids = []
    for _ in range(2):
        run = start_run(client, local, tmp_path / "artifacts")
        ids.append(serving_save.log_model(run, tiny_net, SPLITS, cfg, tmp_path / "staging"))
        run.close("FINISHED", cfg, retry_s=0)
    versions = sorted(client.search_model_versions("name = 'fp8exp-tiny'"), key=lambda v: int(v.version))
    assert [(str(v.version), v.tags, v.run_id) for v in versions] == [
        (str(n), {"precision": "float32"}, client.get_logged_model(ids[n - 1]).source_run_id) for n in (1, 2)]
    assert json.loads(client.get_logged_model(ids[1]).tags["mlflow.modelVersions"]) == \
        [{"name": "fp8exp-tiny", "version": "2"}]
    with _use_tracking_uri(local):
        labels = [list(mlflow.pyfunc.load_model(source).predict(IDS)["label"])
                  for source in ("models:/fp8exp-tiny/2", f"models:/{ids[1]}")]
    assert labels[0] == labels[1] and set(labels[0]) <= {"a", "b"}
    assert [line.split("\t")[0] for line in predicted(local, f"model_id={ids[1]}")] == labels[0]
    # Registering again (a retry after an outage) finds its version instead of adding one.
    model = client.get_logged_model(ids[1])
    again = logged.register_version(client, "fp8exp-tiny", model.artifact_location, model.source_run_id,
                                          "float32", ids[1])
    assert str(again.version) == "2" and len(client.search_model_versions("name = 'fp8exp-tiny'")) == 2


def test_predict_takes_a_run_or_its_model_id_and_old_style_runs_still_work(tmp_path, tiny_net, capsys):
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(local)
    cfg = tiny_config(tmp_path, local)
    new = start_run(client, local, tmp_path / "artifacts")
    new_model = serving_save.log_model(new, tiny_net, SPLITS, cfg, tmp_path / "staging")
    new.close("FINISHED", cfg, retry_s=0)
    old = start_run(client, local, tmp_path / "artifacts")  # saved as fp8exp did before LoggedModels
    meta = serve_meta.describe(tiny_net, precision="float32", class_names=SPLITS.class_names, sequence_length=16,
                                 lowercase=False, vocabulary_size=100, has_vocabulary=False, fp8exp_version="old")
    serving_save.log_artifact_model(old, tiny_net, SPLITS, meta, tmp_path / "staging")
    old.close("FINISHED", cfg, retry_s=0)
    assert {a.path for a in client.list_artifacts(old.run_id, "model")} >= {"model/MLmodel", "model/artifacts"}

    assert locate.locate(new.run_id, local, tmp_path).model_id == new_model
    assert locate.locate(old.run_id, local, tmp_path).model_id is None
    answers = [predicted(local, key) for key in (f"run_id={new.run_id}", f"model_id={new_model}", f"run_id={old.run_id}")]
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 2
    for args, message in ((["model_id=m-0123"], "no model 'm-0123' in the store at sqlite:///"),
                          ([f"run_id={new.run_id}", f"model_id={new_model}"], "give run_id=... or model_id=..., not both")):
        capsys.readouterr()
        assert predict.main([*args, "text=5 6", f"tracking.uri={local}"], out=io.StringIO()) == 2
        assert message in capsys.readouterr().err


def test_an_offline_run_keeps_its_model_as_a_plain_artifact(tmp_path, tiny_net, caplog):
    """tracking.required=false logs to the offline store, whose sync delivers run artifacts."""
    offline = f"sqlite:///{tmp_path / 'offline.db'}"
    client = MlflowClient(offline)
    cfg = tiny_config(tmp_path, "http://127.0.0.1:9", "tracking.register_model=fp8exp-tiny")
    run = start_run(client, offline, tmp_path / "artifacts")
    assert serving_save.log_model(run, tiny_net, SPLITS, cfg, tmp_path / "staging") is None
    run.close("FINISHED", cfg, retry_s=0)
    assert "the model is saved as the run's plain artifact model/, not as a LoggedModel (the run is in the " \
           "offline store" in caplog.text and "not registered as 'fp8exp-tiny' either" in caplog.text
    assert not client.search_logged_models(experiment_ids=[client.get_experiment_by_name("models").experiment_id])
    assert locate.locate(run.run_id, offline, tmp_path).model_id is None
    assert len(predicted(offline, f"run_id={run.run_id}")) == 2


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A real `mlflow server` (proxied artifacts: the model's files are uploaded), stopped at the end."""
    root = tmp_path_factory.mktemp("models_server")
    MlflowClient(f"sqlite:///{root / 'server.db'}").search_experiments()  # the schema, created once
    server = tracking_server(root / "server.db", root / "server-artifacts", root / "server.log")
    try:
        yield server.ensure_up()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_away_never_costs_the_model(tmp_path, tiny_net, remote, monkeypatch, caplog):
    from fp8exp.tracking import offline as tracking_offline
    from fp8exp.tracking.store import fast_failing_http

    cfg = tiny_config(tmp_path, remote.url)
    offline = f"sqlite:///{tmp_path / 'offline.db'}"
    client = MlflowClient(remote.url)
    with fast_failing_http():
        # Up: a LoggedModel, its files uploaded through the run's queue, downloaded by predict.
        run = start_run(client, remote.url)
        up = serving_save.log_model(run, tiny_net, SPLITS, cfg, tmp_path / "staging-up")
        run.close("FINISHED", cfg, retry_s=0)
        assert str(client.get_logged_model(up).status) == "READY"
        labels = predicted(remote.url, f"model_id={up}")
        assert predicted(remote.url, f"run_id={run.run_id}") == labels

        # Away when the model is saved: the plain artifact, queued, then in the offline copy.
        away = start_run(client, remote.url)
        remote.stop()
        assert serving_save.log_model(away, tiny_net, SPLITS, cfg, tmp_path / "staging-away") is None
        assert "not as a LoggedModel (the tracking store" in caplog.text
        away.close("FINISHED", cfg, retry_s=0)
        [copy] = MlflowClient(offline).search_runs(
            [MlflowClient(offline).get_experiment_by_name("models").experiment_id],
            f"tags.`fp8exp.sync.remote_run_id` = '{away.run_id}'")
        assert predicted(offline, f"run_id={copy.info.run_id}") == labels

        # Gone right after the LoggedModel was created: its files still reach the offline copy.
        remote.start()
        gone = start_run(client, remote.url)
        create = logged.create_logged_model

        def create_then_stop(*args):
            made = create(*args)
            remote.stop()
            return made

        monkeypatch.setattr(logged, "create_logged_model", create_then_stop)
        pending = serving_save.log_model(gone, tiny_net, SPLITS, cfg, tmp_path / "staging-gone")
        gone.close("FINISHED", cfg, retry_s=0)
        assert "stayed unreachable" in gone.delivery_note
        remote.start()
        assert str(client.get_logged_model(pending).status) == "PENDING"  # never finalized: not used
        assert tracking_offline.sync(offline, remote.url, out=io.StringIO()) == 0
        assert locate.locate(gone.run_id, remote.url, tmp_path / "located").model_id is None
        assert predicted(remote.url, f"run_id={gone.run_id}") == labels


def trained_model(precision: str):
    """A tiny classifier of token ids under `precision`; float8 trains two steps so its scales move
    (the first step only fills the amax history)."""
    import keras

    from fp8exp.models import classifier as model
    from fp8exp.precision import policy as precision_lib
    from fp8exp.run import train

    cfg = compose_config("data=synthetic", "data.sequence_length=16", "data.vocabulary_size=100",
                         f"precision={precision}", "model.hidden_dim=16", "model.num_heads=2")
    keras.utils.set_random_seed(0)
    net = precision_lib.build(cfg.precision, lambda: model.build_classifier(cfg.model, 100, 16, 2))
    if precision == "float8":
        train.compile_model(net, precision_lib.optimizer(cfg.precision, 1e-3), model.loss_for(2), cfg.trainer)
        rng = np.random.default_rng(0)
        net.fit(rng.integers(0, 100, (64, 16)), rng.integers(0, 2, 64), batch_size=32, epochs=1, verbose=0)
    return net


def saved_state(net) -> dict[str, np.ndarray]:
    return {v.path: np.asarray(v.value) for v in net.variables if "seed_generator" not in v.path}


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_save_and_reload_give_identical_predictions_and_fp8_state(tmp_path, precision):
    net = trained_model(precision)
    meta = serve_meta.describe(net, precision=precision, class_names=["a", "b"], sequence_length=16, lowercase=False,
                            vocabulary_size=100, has_vocabulary=False, fp8exp_version="test")
    serving_save.save_mlflow_model(tmp_path / "model", net, meta, None)
    loaded = serving.TextClassifier.load(tmp_path / "model")

    batch = np.random.default_rng(1).integers(0, 100, (8, 16)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(loaded.model.predict_on_batch(batch)),
                                  np.asarray(net.predict_on_batch(batch)))
    before, after = saved_state(net), saved_state(loaded.model)
    assert set(before) == set(after)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    scales = {path: value for path, value in after.items() if path.endswith("_scale")}
    if precision == "float8":
        assert len(scales) == 8 * 3 and any(float(v) != 1.0 for v in scales.values())
        loaded.classify(["5 17 33", "1 2 3"])  # inference: training=False freezes the scales
        assert all(np.array_equal(saved_state(loaded.model)[path], value) for path, value in scales.items())
    else:
        assert not scales


def test_a_vocabulary_with_line_separators_inside_tokens_round_trips(tmp_path):
    vocabulary = ["[PAD]", "[UNK]", "line\u2028separator", "para\u2029graph", "nel", *[f"w{i}" for i in range(95)]]
    net = trained_model("float32")
    meta = serve_meta.describe(net, precision="float32", class_names=["a", "b"], sequence_length=16, lowercase=False,
                            vocabulary_size=len(vocabulary), has_vocabulary=True, fp8exp_version="test")
    serving_save.save_mlflow_model(tmp_path / "model", net, meta, vocabulary)
    assert serving.TextClassifier.load(tmp_path / "model").vocabulary == vocabulary


@pytest.mark.slow
def test_a_synthetic_model_takes_token_ids_and_says_so_otherwise(tmp_path):
    net = trained_model("float32")
    meta = serve_meta.describe(net, precision="float32", class_names=["a", "b"], sequence_length=16, lowercase=False,
                            vocabulary_size=100, has_vocabulary=False, fp8exp_version="test")
    serving_save.save_mlflow_model(tmp_path / "model", net, meta, None)
    classifier = serving.TextClassifier.load(tmp_path / "model")
    result = classifier.classify(["5 17 33", " ".join(["7"] * 20)])
    assert result.truncated == 1 and set(result.labels) <= {"a", "b"}
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(serving.InputError, match="synthetic data and has no tokenizer: give token ids"):
        classifier.classify(["a wonderful film"])
    with pytest.raises(serving.InputError, match=r"token ids must be in \[0, 100\)"):
        classifier.classify(["5 100"])


# ---------------------------------------------------------------- python -m fp8exp.predict


@pytest.mark.slow
def test_predict_classifies_a_file_and_stdin(store, runs, server, tmp_path):
    # `server` only starts `mlflow models serve` early: it boots while this runs.
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{TEXTS[0]}\n\n{LONG}\n")  # the blank line is skipped
    result = subprocess.run(
        [sys.executable, "-m", "fp8exp.predict", f"run_id={runs['float8']}", f"file={texts}", "file=-",
         f"tracking.uri={uri(store)}"],
        input=TEXTS[1] + "\n", capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [line[2] for line in lines] == [TEXTS[0], predict.one_line(LONG), TEXTS[1]]
    expected = serving.TextClassifier.load(model_dir(store, runs["float8"])).classify([TEXTS[0], LONG, TEXTS[1]])
    assert [line[0] for line in lines] == expected.labels
    assert [float(line[1]) for line in lines] == pytest.approx(list(expected.probability), abs=6e-5)
    assert all(0.5 <= float(line[1]) <= 1.0 for line in lines)
    notes = [line for line in result.stderr.splitlines() if line.startswith("fp8exp.predict:")]
    assert notes == ["fp8exp.predict: note: 1 of 3 inputs were longer than the model's 16 tokens and were truncated"]


def test_a_file_and_stdin_split_texts_at_newlines_only(tmp_path):
    # U+2028, U+0085, a form feed and a lone "\r" are inside texts, not line ends; stdin is read as
    # sys.stdin is (a TextIOWrapper, whose universal newlines would break at the "\r").
    content = "one\u2028text\x85with\x0cseparators\rinside\r\nsecond text\n"
    (tmp_path / "texts.txt").write_text(content, encoding="utf-8", newline="")
    from_file = predict.parse_args(["run_id=x", f"file={tmp_path / 'texts.txt'}"]).texts
    from_stdin = predict.parse_args(["run_id=x"], stdin=io.TextIOWrapper(io.BytesIO(content.encode()))).texts
    assert from_file == from_stdin == ["one\u2028text\x85with\x0cseparators\rinside", "second text"]


@pytest.mark.slow
def test_predict_learned_the_reviews_and_tokenizes_as_training_did(store, runs):
    from fp8exp.data import tokenize

    classifier = serving.TextClassifier.load(model_dir(store, runs["float8"]))
    np.testing.assert_array_equal(classifier.encode(TEXTS + [LONG]).ids,
                                  tokenize.encode([t.lower() for t in TEXTS + [LONG]], classifier.vocabulary, 16))
    for run_id in runs.values():
        out = io.StringIO()
        assert predict.main([f"run_id={run_id}", f"text={TEXTS[0]}", f"text={TEXTS[1]}", "format=jsonl",
                             f"tracking.uri={uri(store)}"], out=out) == 0
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [row["label"] for row in rows] == ["pos", "neg"]
        assert all(set(row["probabilities"]) == {"neg", "pos"} for row in rows)


def copy_run_with_model(store: Path, source_run: str, tmp_path: Path, damage) -> str:
    """A new run holding a damaged copy of `source_run`'s model."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir(store, source_run), copy)
    damage(copy / "artifacts")
    client = MlflowClient(uri(store))
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    client.log_artifacts(run_id, str(copy), "model")
    client.set_terminated(run_id)
    return run_id


def truncate_model(files: Path) -> None:
    data = (files / "model.keras").read_bytes()
    (files / "model.keras").write_bytes(data[: len(data) // 2])


def older_format(files: Path) -> None:
    meta = json.loads((files / "fp8exp_model.json").read_text())
    (files / "fp8exp_model.json").write_text(json.dumps({**meta, "format": 0, "fp8exp_version": "0.0.9"}))


def garbage_in_keras_file(files: Path) -> None:
    (files / "model.keras").write_bytes(b"not a zip archive at all")


@pytest.mark.slow
@pytest.mark.parametrize("case,message", [
    ("unknown run", "no run '0123456789abcdef0123456789abcdef' in the store at sqlite:///"),
    ("no model", "has no saved model (it ran with tracking.save_model=false"),
    ("empty file", "has no text to classify (empty)"),
    ("empty stdin", "stdin has no text to classify (empty)"),
    ("truncated file", "model/artifacts/model.keras is corrupt"),
    ("not a zip", "model/artifacts/model.keras is corrupt"),
    ("older format", "the model was saved by fp8exp 0.0.9 in model format 0; this fp8exp reads formats 1, 2, 3"),
])
def test_predict_bad_input_is_one_line_and_exit_2(store, runs, tmp_path, capsys, case, message):
    run_id, args, stdin = runs["float8"], [], io.StringIO("")
    client = MlflowClient(uri(store))
    if case == "unknown run":
        run_id = "0123456789abcdef0123456789abcdef"
    elif case == "no model":
        run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
        client.set_terminated(run_id)
    elif case == "empty file":
        (tmp_path / "empty.txt").write_text("\n \n")
        args = [f"file={tmp_path / 'empty.txt'}"]
    elif case == "truncated file":
        run_id = copy_run_with_model(store, runs["float8"], tmp_path, truncate_model)
    elif case == "not a zip":
        run_id = copy_run_with_model(store, runs["float8"], tmp_path, garbage_in_keras_file)
    elif case == "older format":
        run_id = copy_run_with_model(store, runs["float8"], tmp_path, older_format)
    if not args and case != "empty stdin":
        args = ["text=a wonderful film"]
    code = predict.main([f"run_id={run_id}", *args, f"tracking_uri={uri(store)}"], stdin=stdin, out=io.StringIO())
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fp8exp.predict: error: ") and "\n" not in err and message in err, err


def test_help_and_argument_errors_are_fast_and_import_no_keras():
    code = ("import io, sys; from fp8exp.serve import predict;"
            "assert predict.main(['--help']) == 0;"
            "assert predict.main(['text=hello']) == 2;"
            "assert predict.main(['run_id=x', 'colour=red']) == 2;"
            "heavy = [m for m in ('keras', 'jax', 'mlflow', 'tensorflow') if m in sys.modules];"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "python -m fp8exp.predict run_id=RUN_ID" in result.stdout
    assert result.stderr.splitlines() == [
        "fp8exp.predict: error: run_id is required: the MLflow run whose model to use (fp8exp prints it after each run), "
        "or model_id=: its LoggedModel's id",
        "fp8exp.predict: error: unknown setting 'colour'; valid keys: run_id, model_id, text, file, tracking.uri, format, "
        "max_new_tokens, sampler, top_k, seed"]


# ---------------------------------------------------------------- mlflow.pyfunc.load_model


@pytest.mark.slow
def test_pyfunc_gives_one_prediction_per_text_for_every_input_shape(store, runs):
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    directory = model_dir(store, runs["float8"])
    model = mlflow.pyfunc.load_model(str(directory))  # schema enforcement included, as served
    expected = serving.TextClassifier.load(directory).classify(TEXTS)
    many = {"DataFrame": pd.DataFrame({"text": TEXTS}), "Series": pd.Series(TEXTS), "list": list(TEXTS),
            "dict of a list": {"text": list(TEXTS)}, "array": np.array(TEXTS)}
    one = {"string": TEXTS[0], "dict of a string": {"text": TEXTS[0]}}
    for shape, model_input in [*many.items(), *one.items()]:
        answer, count = model.predict(model_input), 2 if shape in many else 1
        assert list(answer["label"]) == expected.labels[:count], shape
        assert list(answer["probability"]) == pytest.approx(list(expected.probability[:count]), abs=1e-6), shape
    for model_input in ([TEXTS[0], None, " "], {"text": [TEXTS[0], None, ""]}):
        with pytest.raises(MlflowException, match=r"row 1: text is null, row 2: text is empty"):
            model.predict(model_input)


@pytest.mark.slow
def test_a_saved_model_loads_and_predicts_without_fp8exp(store, runs, tmp_path):
    """Also under an older layout's code file name (fp8exp/serving.py): MLflow loads the copy in the
    model directory by its base name, so where fp8exp keeps its modules does not matter."""
    import ast

    import yaml

    current = model_dir(store, runs["float8"])
    mlmodel = yaml.safe_load((current / "MLmodel").read_text())
    code_file = Path(mlmodel["flavors"]["python_function"]["model_code_path"]).name  # the copy MLflow loads
    tree = ast.parse((current / code_file).read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += ["." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "mlflow.pyfunc" in modules and not [m for m in modules if m.split(".")[0] in ("fp8exp", "")], modules
    shipped = [ast.parse(path.read_text()) for path in (current / "code").rglob("*.py")]  # textmodel/, pooling.py
    assert len(shipped) > 2 and not [node.module for tree in shipped for node in ast.walk(tree)
                                     if isinstance(node, ast.ImportFrom) and not node.level
                                     and (node.module or "").split(".")[0] == "fp8exp"]
    assert not [alias.name for tree in shipped for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names if alias.name.split(".")[0] == "fp8exp"]

    older = tmp_path / "older"
    shutil.copytree(current, older)
    (older / code_file).rename(older / "serving.py")
    mlmodel["flavors"]["python_function"]["model_code_path"] = "/gone/site-packages/fp8exp/serving.py"
    (older / "MLmodel").write_text(yaml.safe_dump(mlmodel))

    script = ("import sys; sys.modules['fp8exp'] = None\n"
              "import mlflow.pyfunc\n"
              "for path in sys.argv[1:]:\n"
              "    print(list(mlflow.pyfunc.load_model(path).predict([" + repr(TEXTS[0]) + "])['label']))\n"
              "assert sys.modules['fp8exp'] is None and not [m for m in sys.modules if m.startswith('fp8exp.')]\n"
              "import keras; assert keras.backend.backend() == 'jax', keras.backend.backend()\n")
    environment = {name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"}  # fp8exp sets it
    environment["MLFLOW_TRACKING_URI"] = uri(store)  # models:/ and runs:/ are looked up there
    sources = [str(current), str(older), f"models:/{model_id(store, runs['float8'])}", f"runs:/{runs['float8']}/model"]
    result = subprocess.run([sys.executable, "-c", script, *sources], capture_output=True,
                            text=True, cwd=tmp_path, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["['pos']"] * 4


# ---------------------------------------------------------------- mlflow models serve


@pytest.fixture(scope="module")
def server(store, runs, tmp_path_factory):
    """Started when first asked for and left to boot (imports, model load: seconds) while other
    tests run; stopped when the module's tests are done."""
    started = model_server(uri(store), f"models:/{model_id(store, runs['float8'])}",
                           tmp_path_factory.mktemp("serve") / "serve.log").start(wait=False)
    try:
        yield started
    finally:
        started.stop()


def invoke(base: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_served_model_answers_a_request_on_localhost(store, runs, server):
    served = server.wait_ready().url
    status, answer = invoke(served, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}})
    assert status == 200, answer
    predictions = answer["predictions"]
    expected = serving.TextClassifier.load(model_dir(store, runs["float8"])).classify(TEXTS)
    assert [p["label"] for p in predictions] == expected.labels == ["pos", "neg"]
    assert [p["probability"] for p in predictions] == pytest.approx(list(expected.probability), abs=1e-6)
    for body in ({"dataframe_records": [{"text": t} for t in TEXTS]}, {"inputs": TEXTS}, {"inputs": {"text": TEXTS}},
                 {"instances": TEXTS}):
        status, answer = invoke(served, body)
        assert status == 200 and [p["label"] for p in answer["predictions"]] == expected.labels, (body, answer)
    status, answer = invoke(served, {"dataframe_records": [{"comment": "no text column"}]})
    assert status == 400 and "text" in answer["message"]
    status, answer = invoke(served, {"dataframe_split": {"columns": ["text"], "data": [[TEXTS[0]], [None], [""]]}})
    assert status == 400 and "row 1: text is null, row 2: text is empty" in answer["message"], answer
