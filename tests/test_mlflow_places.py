"""What the MLflow UI shows at a glance: a run's data as dataset inputs (Dataset column and filter),
its system metrics (System metrics charts), its source (Source column), and its experiment marked
as model training. Three tiny runs, shared by the tests that need a finished run."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fp8exp.config import validate
from fp8exp.data import Splits, load
from fp8exp.run.experiment import run_experiment
from fp8exp.run.launch import LaunchContext, source_tags
from fp8exp.tracking import offline, system
from fp8exp.tracking.datasets import CONTEXT_TAG, dataset_inputs
from fp8exp.tracking.offline import Journal
from fp8exp.tracking.run import MlflowRun
from fp8exp.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment
from tests.conftest import tracked

TINY = ["precision=float32", "trainer.epochs=1", "trainer.steps_per_epoch=4", "trainer.eval_steps=2",
        "tracking.save_model=false"]
SIZES = {"train": 512, "validation": 128, "test": 128}  # conftest.FAST
SYSTEM = ["system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
          "system/disk_usage_percentage"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`a` and `b` train on the same data (another seed for the model), `c` on other data without
    system metrics."""
    store = tmp_path_factory.mktemp("places")
    overrides = {"a": [], "b": ["trainer.seed=7"], "c": ["data.seed=1", "tracking.system_metrics=false"]}
    cfgs, ids = {}, {}
    for name, extra in overrides.items():
        cfgs[name] = tracked(store, *TINY, f"tracking.run_name={name}", *extra)
        validate(cfgs[name])
        ids[name] = run_experiment(cfgs[name], LaunchContext(entry_point="python -m fp8exp")).run_id
    client = MlflowClient(cfgs["a"].tracking.uri)
    return client, {name: client.get_run(run_id) for name, run_id in ids.items()}, cfgs


def datasets_of(run) -> dict[str, object]:
    """context -> Dataset."""
    return {next(t.value for t in i.tags if t.key == CONTEXT_TAG): i.dataset for i in run.inputs.dataset_inputs}


# --- datasets ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_each_split_is_a_dataset_whose_digest_is_the_data_fingerprint(runs):
    client, found, cfgs = runs
    fingerprint = load(cfgs["a"].data).fingerprint
    assert len(fingerprint) == 20
    datasets = datasets_of(found["a"])
    assert set(datasets) == {"train", "validation", "test"}
    for context, dataset in datasets.items():
        assert dataset.name == f"synthetic:{context}" and dataset.digest == fingerprint
        profile = json.loads(dataset.profile)
        assert profile["num_rows"] == SIZES[context] and profile["num_classes"] == 2
        assert sum(profile["class_counts"].values()) == SIZES[context]
        assert set(profile["class_counts"]) == {"class_0", "class_1"}
        schema = json.loads(dataset.schema)["mlflow_tensorspec"]
        assert json.loads(schema["features"])[0]["tensor-spec"] == {"dtype": "int32", "shape": [-1, 32]}
        assert dataset.source_type == "code"


@pytest.mark.slow
def test_runs_on_the_same_data_share_datasets_and_the_filter_finds_them(runs):
    client, found, cfgs = runs
    a, b, c = (datasets_of(found[name]) for name in "abc")
    assert {k: (d.name, d.digest) for k, d in a.items()} == {k: (d.name, d.digest) for k, d in b.items()}
    assert a["train"].digest != c["train"].digest  # data.seed=1: other data, another digest
    experiment = found["a"].info.experiment_id
    same = client.search_runs([experiment], f"dataset.digest = '{a['train'].digest}' and dataset.context = 'train'")
    assert {r.info.run_name for r in same} == {"a", "b"}
    assert len(client.search_runs([experiment], "dataset.name = 'synthetic:test'")) == 3


def test_the_fingerprint_is_the_content_so_only_other_data_changes_it(tmp_path):
    x, y = np.arange(40, dtype=np.int32).reshape(10, 4), np.zeros(10, np.int32)
    splits = Splits(x, y, x, y, x, y, ["a", "b"], 8)
    # Nothing cut: the same data; 8 of 10 kept, whatever the device count asking for it: the same data.
    assert splits.divisible_by(2).fingerprint == splits.fingerprint
    assert splits.divisible_by(4).fingerprint == splits.divisible_by(8).fingerprint != splits.fingerprint
    assert Splits(x.copy(), y, x, y, x, y, ["a", "b"], 8).fingerprint == splits.fingerprint  # another copy, same data
    other = x.copy()
    other[0, 0] = 1
    assert Splits(other, y, x, y, x, y, ["a", "b"], 8).fingerprint != splits.fingerprint
    assert Splits(x, y, x, y, x, y, ["a", "c"], 8).fingerprint != splits.fingerprint


def summary(digest: str) -> dict:
    counts = {"neg": 3, "pos": 1}
    return {"name": "clothing_reviews.parquet", "digest": digest, "source": "/data/clothing_reviews.parquet",
            "sequence_length": 16, "splits": {c: {"num_rows": 4, "class_counts": counts}
                                              for c in ("train", "validation", "test")}}


def test_the_offline_copy_holds_the_datasets_and_sync_delivers_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stand-in server keeps its artifacts under ./mlruns
    source, target = f"sqlite:///{tmp_path / 'offline.db'}", f"sqlite:///{tmp_path / 'server.db'}"
    journal = Journal("fp8exp", "lost", int(time.time() * 1000), inputs=dataset_inputs(**summary("d" * 20)))
    offline_id = offline.write_offline(journal, "FINISHED", int(time.time() * 1000), source, target, None)
    local = MlflowClient(source).get_run(offline_id)
    assert {d.name for d in datasets_of(local).values()} == {
        "clothing_reviews.parquet:train", "clothing_reviews.parquet:validation", "clothing_reviews.parquet:test"}
    assert datasets_of(local)["test"].source == json.dumps({"uri": "/data/clothing_reviews.parquet"})

    assert offline.sync(source, target, io.StringIO()) == 0
    server = MlflowClient(target)
    [copy] = server.search_runs([e.experiment_id for e in server.search_experiments()])
    delivered = datasets_of(server.get_run(copy.info.run_id))
    assert set(delivered) == {"train", "validation", "test"} and delivered["train"].digest == "d" * 20


# --- system metrics ------------------------------------------------------------------------------

@pytest.mark.slow
def test_system_metrics_on_a_finished_run_and_none_when_off(runs):
    client, found, _ = runs
    for key in SYSTEM:
        assert key in found["a"].data.metrics, key
        assert all(m.step >= 0 for m in client.get_metric_history(found["a"].info.run_id, key))
    assert 0 <= found["a"].data.metrics["system/cpu_utilization_percentage"] <= 100
    assert not [key for key in found["c"].data.metrics if key.startswith("system/")]


class DeadStore:
    """A client whose every call fails as an unreachable server's would, counting them."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            raise OSError("connection refused")
        return call


def test_system_metrics_go_through_the_runs_queue_never_to_the_store_directly(monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    client = DeadStore()
    run = MlflowRun(client, "r1", "http://127.0.0.1:9", Journal("fp8exp", "r", int(time.time() * 1000)))
    monitor = system.start(run)
    time.sleep(0.5)
    monitor.finish()
    sampled = [m for m in run.journal.metrics if m.key == "system/cpu_utilization_percentage"]
    assert len(sampled) >= 2  # samples while running, and the last one at finish
    assert client.calls == []  # nothing sent from the monitor's thread: the run's flush does it
    run.flush()
    assert client.calls == ["log_batch"] and run.in_outage  # queued, kept for the offline copy


# --- source and experiment kind --------------------------------------------------------------------

@pytest.mark.slow
def test_runs_name_their_source(runs, monkeypatch):
    _, found, _ = runs
    tags = found["a"].data.tags
    assert tags["mlflow.source.name"] == "python -m fp8exp" and tags["mlflow.source.type"] == "LOCAL"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert source_tags("python -m fp8exp")["mlflow.source.type"] == "JOB"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert source_tags()["mlflow.source.name"]  # this process's: pytest's
    assert source_tags()["mlflow.source.type"] == "LOCAL"


@pytest.mark.slow
def test_experiments_are_marked_model_training(runs, tmp_path):
    client, found, _ = runs
    assert EXPERIMENT_KIND_TAG == "mlflow.experimentKind" and EXPERIMENT_KIND == "custom_model_development"
    assert client.get_experiment(found["a"].info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    other = MlflowClient(f"sqlite:///{tmp_path / 'other.db'}")
    old = other.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())  # before this change
    chosen = other.create_experiment("genai", artifact_location=(tmp_path / "b").as_uri(),
                                     tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment(other, "old", None) == old
    assert other.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert ensure_experiment(other, "genai", None) == chosen
    assert other.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a choice stays
