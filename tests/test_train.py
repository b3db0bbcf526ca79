"""The training loop counts the optimizer steps that really ran and times only calls that ran a
compiled step (not the compiler): with steps_per_execution > 1 and with a partial last batch."""

from __future__ import annotations

import keras
import pytest

from fp8exp import data
from fp8exp.models import classifier
from fp8exp.precision import policy
from fp8exp.run import train
from tests.conftest import compose_config

TINY = ["data=synthetic", "data.sequence_length=16", "data.num_validation=32", "data.num_test=32",
        "data.vocabulary_size=200", "trainer.epochs=2", "trainer.batch_size=32", "precision=float32", "tracking=none"]


def trained(*overrides: str):
    cfg = compose_config(*TINY, *overrides)
    splits = data.load(cfg.data)
    net = policy.build(cfg.precision, lambda: classifier.build_classifier(
        cfg.model, splits.vocabulary_size, splits.sequence_length, splits.num_classes))
    train.compile_model(net, policy.optimizer(cfg.precision, cfg.trainer.learning_rate),
                        classifier.loss_for(splits.num_classes), cfg.trainer)
    return net, train.fit_and_evaluate(net, splits, cfg.trainer, [])


@pytest.mark.slow
def test_steps_per_execution_counts_the_steps_that_ran():
    # 5 batches per epoch, 2 steps per call: each epoch ends with a call of one step, which Keras
    # reports as ending one step later than it did.
    net, result = trained("data.num_train=160", "trainer.steps_per_execution=2")
    assert result.steps == 10 == int(keras.ops.convert_to_numpy(net.optimizer.iterations))
    assert [(call.step, call.steps) for call in result.timer.calls] == [(2, 2), (4, 2), (5, 1), (7, 2), (9, 2), (10, 1)]


@pytest.mark.slow
def test_a_partial_last_batch_recompiles_and_is_not_timed_as_a_step():
    # 150 examples: 4 batches of 32 and one of 22, whose new shape compiles once (epoch 1 only).
    _, result = trained("data.num_train=150")
    calls = result.timer.calls
    assert [call.compiled for call in calls] == [True, False, False, False, True] + [False] * 5
    # The partial batches do less work than a step, and each epoch's first call re-gathers the state
    # validation synced: timed are the full, compiled steps 2-4 and 7-9.
    assert [call.partial for call in calls] == [False] * 4 + [True] + [False] * 4 + [True]
    assert [call.step for call in calls if call.timed] == [2, 3, 4, 7, 8, 9]
    metrics = train.perf_metrics(result, 32, 16)
    assert metrics["perf/timed_steps"] == 6
    assert metrics["perf/compile_s"] == pytest.approx(result.timer.calls[0].seconds + result.timer.calls[4].seconds)
