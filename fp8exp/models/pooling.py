"""SequencePooling: one vector per example from a backbone's (batch, length, hidden) states and
their padding mask, the pooling of task=classify on the keras-hub families (families.py).

It imports Keras only, never the rest of fp8exp: a saved family classifier ships this file with
its MLflow model (save.py, `code_paths`), so the model loads and serves without fp8exp installed.
It stays registered as "fp8exp>SequencePooling", the name saved model configs refer to."""

from __future__ import annotations

import keras

POOLINGS = ("last", "mean", "first")


@keras.saving.register_keras_serializable(package="fp8exp")
class SequencePooling(keras.layers.Layer):
    """One vector per example from (batch, length, hidden) states and their padding mask: `last`,
    the state of the last non-padding token (what a causal decoder has read everything by; left or
    right padding alike), `mean` over non-padding tokens, or `first` (the [CLS] position)."""

    def __init__(self, mode: str = "last", **kwargs):
        super().__init__(**kwargs)
        if mode not in POOLINGS:
            raise ValueError(f"pooling {mode!r}; valid: {', '.join(POOLINGS)}")
        self.mode = mode

    def call(self, sequence, padding_mask):
        ops = keras.ops
        if self.mode == "first":
            return sequence[:, 0, :]
        mask = ops.cast(padding_mask, sequence.dtype)
        if self.mode == "mean":
            total = ops.sum(sequence * mask[:, :, None], axis=1)
            return total / ops.maximum(ops.sum(mask, axis=1, keepdims=True), 1)
        length = ops.shape(sequence)[1]
        positions = ops.arange(length, dtype="int32")[None, :]
        last = ops.max(ops.where(ops.cast(padding_mask, "bool"), positions, 0), axis=1)
        return ops.sum(sequence * ops.one_hot(last, length, dtype=sequence.dtype)[:, :, None], axis=1)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
