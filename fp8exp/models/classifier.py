"""The classifier of the reference Keras FP8 example, sized by the `model` config group.

TokenAndPositionEmbedding -> Dropout -> TransformerDecoder x num_layers -> GlobalAveragePooling1D
-> Dropout -> Dense(intermediate, relu) -> Dropout -> Dense head. Built under whatever dtype
policy is global at call time; precision.py decides that policy and any quantization.
Layers are named explicitly so variable paths (and so FP8 metric names) are the same in
every process, not `dense_3` because three models were built before.
"""

from __future__ import annotations

import keras
import keras_hub
from omegaconf import DictConfig


def build_classifier(model: DictConfig, vocabulary_size: int, sequence_length: int,
                     num_classes: int) -> keras.Model:
    """Two classes keep the example's sigmoid unit; more get a softmax over the classes."""
    inputs = keras.layers.Input(shape=(sequence_length,), dtype="int32", name="token_ids")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=vocabulary_size,
        sequence_length=sequence_length,
        embedding_dim=model.hidden_dim,
        name="token_and_position_embedding",
    )(inputs)
    x = keras.layers.Dropout(model.dropout)(x)
    for index in range(model.num_layers):
        x = keras_hub.layers.TransformerDecoder(
            intermediate_dim=model.intermediate_dim,
            num_heads=model.num_heads,
            dropout=model.dropout,
            name="transformer_decoder" + (f"_{index}" if index else ""),
        )(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dropout(model.dropout)(x)
    x = keras.layers.Dense(model.intermediate_dim, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(model.dropout)(x)
    if num_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    else:
        outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="fp8exp_classifier")


def loss_for(num_classes: int) -> str:
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
