"""task=causal_lm end to end: packing documents into windows, and the decoder families trained on
them through run_experiment in float32 and float8, logged to a SQLite store."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fp8exp import data
from fp8exp.config import ConfigError, validate
from fp8exp.data.packing import pack, pack_splits
from fp8exp.models import families
from fp8exp.precision import policy
from fp8exp.precision.scales import scale_variables
from fp8exp.run.experiment import run_experiment
from tests.conftest import CLOTHING, compose_config, needs_clothing, tracked

LM = ["task=causal_lm", "trainer.steps_per_epoch=6", "tracking.fp8_log_every=4", "data.num_train=96",
      "data.num_validation=32", "data.num_test=32"]


def test_packing_gives_exact_windows_and_keeps_splits_apart():
    lengths = {"train": [5, 9, 30, 1], "validation": [7, 7], "test": [20]}
    base = {"train": 100, "validation": 200, "test": 300}  # each split's own token range
    documents = {split: [np.full(n, base[split] + i, np.int32) for i, n in enumerate(ns)]
                 for split, ns in lengths.items()}
    packed = pack_splits(documents, sequence_length=4, end_of_text=1)
    for split, ns in lengths.items():
        tokens = sum(ns) + len(ns)  # one end-of-text token after each document
        assert packed[split].shape == (tokens // 5, 5)
        ids = packed[split][packed[split] != 1]
        assert ((ids >= base[split]) & (ids < base[split] + 100)).all(), split
    # The stream is kept in order: a window is a contiguous stretch of it.
    assert pack([np.arange(2, 7), np.arange(10, 13)], 4, 1).tolist() == [[2, 3, 4, 5], [6, 1, 10, 11]]


def test_a_corpus_too_small_for_one_training_window_is_one_line(tmp_path):
    table = tmp_path / "tiny.csv"
    table.write_text("text,label\n" + "".join(f"word {i},{i % 2}\n" for i in range(20)))
    cfg = compose_config("data=table", f"data.path={table}", f"data.cache_dir={tmp_path / 'cache'}",
                         "data.sequence_length=64", "data.vocabulary_size=300", "task=causal_lm", "model=llama_tiny")
    with pytest.raises(ConfigError, match=r"^data.sequence_length: the train split has \d+ tokens, too few") as error:
        data.load(cfg.data, cfg.task.name)
    assert "\n" not in str(error.value)


def test_bert_cannot_do_causal_lm_in_one_line():
    with pytest.raises(ConfigError, match="^model.family: bert cannot do task=causal_lm .*gpt2, llama, gemma$"):
        validate(compose_config("data=synthetic", "data.sequence_length=32", "model=bert_tiny", "task=causal_lm"))


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.parametrize("model,precision", [("llama_tiny", "float32"), ("llama_tiny", "float8"),
                                             ("gpt2_tiny", "float8")])
def test_a_decoder_trains_as_a_language_model(store, model, precision):
    cfg = tracked(store, *LM, f"model={model}", f"precision={precision}", "tracking.experiment=causal_lm")
    validate(cfg)
    outcome = run_experiment(cfg)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["task"] == "causal_lm"
    losses = _history(client, outcome.run_id, "train/loss")
    assert len(losses) == 2 and losses[1] < losses[0]
    metrics = run.data.metrics
    for key in ("val/loss", "val/perplexity", "test/loss", "test/perplexity", "perf/tokens_per_s"):
        assert np.isfinite(metrics[key]), key
    assert metrics["test/perplexity"] == pytest.approx(np.exp(metrics["test/loss"]), rel=1e-5)
    assert "test/accuracy" in metrics  # token accuracy, from logits
    if precision == "float8":
        built = policy.build(cfg.precision, lambda: families.build_causal_lm(cfg.model, cfg.data.vocabulary_size))
        expected = {f"fp8/{entry.layer}/{entry.tensor}_scale" for entry in scale_variables(built)}
        assert expected and expected <= set(metrics)
    else:
        assert not any(key.endswith("_scale") for key in metrics)
    saved = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == outcome.run_id]
    assert [m.model_type for m in saved] == ["fp8exp-language-model"]  # predict generates from it


@pytest.mark.slow
@needs_clothing
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "float8"])
def test_a_language_model_trains_on_the_shared_corpus_text(store, tmp_path_factory, precision, capsys):
    cache = tmp_path_factory.getbasetemp() / "lm-cache"  # one tokenization for both precisions
    cfg = compose_config(f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"tracking.artifact_root={store / 'artifacts'}",
                         "trainer.batch_size=32", "data=table", f"data.path={CLOTHING}", "data.text_column=text", f"data.cache_dir={cache}",
                         "data.sequence_length=32", "data.vocabulary_size=2000", "task=causal_lm", "model=llama_tiny",
                         f"precision={precision}", "trainer.epochs=1", "trainer.steps_per_epoch=20",
                         "trainer.eval_steps=10", "tracking.experiment=causal_lm_corpus",
                         "tracking.log_every_steps=5", "trainer.eval_every_steps=10")
    validate(cfg)
    outcome = run_experiment(cfg)
    client = MlflowClient(cfg.tracking.uri)
    steps = {key: {m.step: m.value for m in client.get_metric_history(outcome.run_id, key)}
             for key in ("train/loss_step", "val/loss_step", "val/perplexity_step", "val/loss")}
    assert sorted(steps["train/loss_step"]) == [5, 10, 15, 20]  # at optimizer steps
    assert sorted(steps["val/loss_step"]) == sorted(steps["val/perplexity_step"]) == [10, 20]
    assert steps["val/perplexity_step"][10] == pytest.approx(np.exp(steps["val/loss_step"][10]), rel=1e-5)
    assert steps["val/loss_step"][20] == pytest.approx(steps["val/loss"][1], rel=1e-5)  # the epoch's end
    assert np.isfinite(outcome.metrics["test/perplexity"])
    assert outcome.metrics["test/perplexity"] < 2000  # below a uniform guess over the vocabulary
    assert "test perplexity" in capsys.readouterr().out
    print(f"\n{precision}: test/loss {outcome.metrics['test/loss']:.4f} "
          f"test/perplexity {outcome.metrics['test/perplexity']:.2f}")


def test_a_vocabulary_too_small_for_byte_level_bpe_is_refused_before_loading():
    cfg = compose_config("data=table", "data.path=/nonexistent.csv", "data.vocabulary_size=256", "task=causal_lm",
                         "model=llama_tiny")
    with pytest.raises(ConfigError, match=r"^data.vocabulary_size: 256 is too small for the byte-level BPE"):
        validate(cfg)
