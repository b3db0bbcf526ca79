"""What differs between tasks (conf/task/) in a run: the model, its loss and metrics, how a batch
of split arrays becomes model inputs, and the end-of-run metrics. experiment.py stays task-free.

    classify   the reference classifier (model.family=classifier) on padded ids and labels, or any
               keras-hub family with a pooled output and a Dense head (families.build_classifier).
    causal_lm  families.build_causal_lm (gpt2/llama/gemma) on packed windows of sequence_length + 1
               tokens: inputs {"token_ids", "padding_mask"} = tokens [0, L), labels tokens [1, L].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
from omegaconf import DictConfig

from fp8exp.data import Splits
from fp8exp.models import classifier, families
from fp8exp.run import train


def task_name(cfg: DictConfig) -> str:
    """cfg.task.name; classify for a config composed without the task group."""
    task = cfg.get("task")
    return task.get("name", "classify") if task is not None else "classify"


def build_model(cfg: DictConfig, splits: Splits) -> keras.Model:
    """The task's model, built under whatever dtype policy is global (policy.build sets it)."""
    if task_name(cfg) == "causal_lm":
        return families.build_causal_lm(cfg.model, splits.vocabulary_size)
    if cfg.model.family != "classifier":
        return families.build_classifier(cfg.model, splits.vocabulary_size, splits.num_classes)
    return classifier.build_classifier(cfg.model, splits.vocabulary_size, splits.sequence_length, splits.num_classes)


def compile_options(cfg: DictConfig, splits: Splits) -> dict:
    """loss and metrics for train.compile_model."""
    if task_name(cfg) == "causal_lm":
        # Token accuracy (the share of next tokens predicted exactly), instead of keras-hub's own
        # `sparse_categorical_accuracy` under a longer name.
        return {"loss": families.causal_lm_loss(), "metrics": (),
                "weighted_metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}
    return {"loss": classifier.loss_for(splits.num_classes)}


def batch_inputs(cfg: DictConfig) -> Callable[[np.ndarray, np.ndarray], tuple[object, np.ndarray]]:
    """(x rows, y rows) of the splits -> (model inputs, labels): as they are for the reference
    classifier (train.as_they_are). A keras-hub family takes {"token_ids", "padding_mask"}: for classify the mask marks
    the non-[PAD] ids; a packed causal_lm window has no padding, so every position counts."""
    if task_name(cfg) == "causal_lm":
        def to_inputs(windows: np.ndarray, _unused: np.ndarray):
            x, y, _ = families.causal_lm_batch(windows, np.ones(windows.shape, bool))
            return x, y

        return to_inputs
    if cfg.model.family == "classifier":
        return train.as_they_are
    return lambda ids, labels: (families.classifier_inputs(ids), labels)


def derived(cfg: DictConfig, metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus what the task derives from them: a language model's perplexity = exp(loss)
    (`val_loss` -> `val_perplexity` too)."""
    if task_name(cfg) != "causal_lm":
        return dict(metrics)
    extra = {key.replace("loss", "perplexity"): _perplexity(float(metrics[key]))
             for key in ("loss", "val_loss") if key in metrics}
    return {**metrics, **extra}


class Perplexity(keras.callbacks.Callback):
    """causal_lm: adds `perplexity` and `val_perplexity` to each epoch's logs, so the epoch logger
    after it records train/perplexity and val/perplexity beside the losses."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(derived(self.cfg, logs))


def callbacks(cfg: DictConfig) -> list[keras.callbacks.Callback]:
    """Callbacks the task adds ahead of the loggers."""
    return [Perplexity(cfg)] if task_name(cfg) == "causal_lm" else []


def final_metrics(cfg: DictConfig, test: dict[str, float]) -> dict[str, float]:
    """`test/...` from the final evaluation; causal_lm adds test/perplexity = exp(test/loss)."""
    final = {f"test/{key}": value for key, value in test.items()}
    if task_name(cfg) == "causal_lm":
        final["test/perplexity"] = _perplexity(test["loss"])
    return final


def _perplexity(loss: float) -> float:
    return float(math.exp(min(loss, 700.0)))  # exp overflows a float past ~709


def headline(metrics: dict[str, float]) -> str:
    """The summary's result: test accuracy and loss, or for a language model loss and perplexity."""
    if "test/perplexity" in metrics:
        return f"test loss {metrics['test/loss']:.4f}, test perplexity {metrics['test/perplexity']:.2f}"
    return f"test accuracy {metrics['test/accuracy']:.4f}, test loss {metrics['test/loss']:.4f}"
