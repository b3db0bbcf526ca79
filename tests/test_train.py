"""The training loop counts the optimizer steps that really ran and times only calls that ran a
compiled step (not the compiler): with steps_per_execution > 1 and with a partial last batch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fp8exp import data
from fp8exp.models import classifier
from fp8exp.precision import policy
from fp8exp.run import train
from fp8exp.tracking.callbacks import StepLogger
from tests.conftest import compose_config

TINY = ["data=synthetic", "data.sequence_length=16", "data.num_validation=32", "data.num_test=32",
        "data.vocabulary_size=200", "trainer.epochs=2", "trainer.batch_size=32", "precision=float32", "tracking=none"]


def trained(*overrides: str, callbacks=lambda net, splits, cfg: []):
    cfg = compose_config(*TINY, *overrides)
    keras.utils.set_random_seed(cfg.trainer.seed)
    splits = data.load(cfg.data)
    net = policy.build(cfg.precision, lambda: classifier.build_classifier(
        cfg.model, splits.vocabulary_size, splits.sequence_length, splits.num_classes))
    train.compile_model(net, policy.optimizer(cfg.precision, cfg.trainer.learning_rate),
                        classifier.loss_for(splits.num_classes), cfg.trainer)
    return net, train.fit_and_evaluate(net, splits, cfg.trainer, callbacks(net, splits, cfg))


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


class Recorder:
    """Where StepLogger sends its metrics: {key: {step: value}}."""

    def __init__(self):
        self.series: dict[str, dict[int, float]] = {}

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.series.setdefault(key, {})[step] = value


@pytest.mark.slow
def test_step_curves_match_the_epoch_metrics_and_leave_training_unchanged():
    # 6 batches an epoch: train/loss_step every 2 steps (3 windows an epoch), validation every 3.
    recorder = Recorder()
    plain, _ = trained("data.num_train=192", "model.dropout=0.0")
    net, result = trained("data.num_train=192", "model.dropout=0.0", callbacks=lambda net, splits, cfg: [
        StepLogger(recorder, train_every=2, val_every=3, validate=lambda model: train.validate(model, splits, cfg.trainer))])
    for ours, theirs in zip(net.weights, plain.weights):  # evaluating between steps changes nothing
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))
    history = net.history.history
    windows = recorder.series["train/loss_step"]
    assert sorted(windows) == [2, 4, 6, 8, 10, 12]
    for epoch, steps in enumerate(([2, 4, 6], [8, 10, 12])):
        assert np.mean([windows[s] for s in steps]) == pytest.approx(history["loss"][epoch], rel=1e-5)
    assert sorted(recorder.series["val/loss_step"]) == [3, 6, 9, 12]
    # At an epoch's last step, the interval validation sees what the epoch's validation sees.
    assert recorder.series["val/loss_step"][6] == pytest.approx(history["val_loss"][0], rel=1e-6)
    assert recorder.series["val/loss_step"][12] == pytest.approx(history["val_loss"][1], rel=1e-6)
    assert result.steps == 12


@pytest.mark.slow
def test_step_curves_weigh_a_partial_batch_by_its_examples_and_carry_an_epoch_s_last_steps():
    # 100 examples in batches of 32: each epoch is 32, 32, 32 and 4. Windows of one step give every
    # step's own loss; windows of three steps span the epochs (steps 4 | 5 6, weighted 4 : 32 : 32).
    every_step, every_three = Recorder(), Recorder()
    net, _ = trained("data.num_train=100", callbacks=lambda net, splits, cfg: [
        StepLogger(every_step, train_every=1), StepLogger(every_three, train_every=3)])
    one = every_step.series["train/loss_step"]
    weights = [32, 32, 32, 4]
    for epoch in range(2):
        steps = range(epoch * 4 + 1, epoch * 4 + 5)
        assert np.dot([one[s] for s in steps], weights) / 100 == pytest.approx(net.history.history["loss"][epoch],
                                                                              rel=1e-5)
    three = every_three.series["train/loss_step"]
    assert sorted(three) == [3, 6]
    assert three[3] == pytest.approx(np.mean([one[1], one[2], one[3]]), rel=1e-5)
    assert three[6] == pytest.approx((one[4] * 4 + one[5] * 32 + one[6] * 32) / 68, rel=1e-5)
