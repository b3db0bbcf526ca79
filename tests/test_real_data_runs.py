"""Whole runs on real text: IMDB through a local mirror, and the shared clothing-reviews corpus."""

import pytest
from mlflow.tracking import MlflowClient

from fp8exp.config import validate
from fp8exp.data import imdb, load
from fp8exp.run.experiment import run_experiment
from tests.conftest import CLOTHING, compose_config, needs_clothing
from tests.test_data import served, sha256  # noqa: F401  (served is a fixture)

pytestmark = pytest.mark.slow


def store_overrides(tmp_path):
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'artifacts'}",
            f"data.cache_dir={tmp_path / 'cache'}"]


def test_imdb_run_through_a_local_mirror(tmp_path, served):  # noqa: F811
    url, archive = served
    cfg = compose_config("data=imdb", f"data.url={url}/{imdb.ARCHIVE}", f"data.sha256={sha256(archive)}",
                         "data.vocabulary_size=200", "data.sequence_length=16", "precision=float8",
                         "trainer.epochs=1", *store_overrides(tmp_path))
    validate(cfg)
    outcome = run_experiment(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/num_train"] == 32 and run.data.metrics["data/num_test"] == 40
    assert run.data.tags["data.class_names"] == "neg, pos"
    vocabulary = client.download_artifacts(outcome.run_id, "vocabulary.txt", str(tmp_path))
    assert open(vocabulary).read().split("\n")[:2] == ["[PAD]", "[UNK]"]


@needs_clothing
def test_clothing_reviews_learn_above_the_majority_rate(tmp_path):
    """81.9% of the reviews recommend the product: a model that learned nothing scores that."""
    cfg = compose_config("data=table", f"data.path={CLOTHING}", "data.text_column=text", "data.label_column=label",
                         "data.sequence_length=64", "data.vocabulary_size=5000", "precision=float8",
                         "trainer.epochs=1", *store_overrides(tmp_path))
    validate(cfg)
    outcome = run_experiment(cfg)
    assert outcome.metrics["test/accuracy"] > 0.819 + 0.02
    assert MlflowClient(cfg.tracking.uri).get_run(outcome.run_id).data.tags["data.cache_hit"] == "false"
    assert load(cfg.data).cache_hit  # a second run (a sweep's next job) prepares nothing
