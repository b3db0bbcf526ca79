"""A saved classifier (task=classify): strings in, labels and probabilities out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import IDS_AND_MASK, PAD
from .tokens import Tokens

INFERENCE_BATCH = 256


@dataclass
class Encoded:
    ids: np.ndarray
    truncated: int
    """How many inputs were longer than the sequence length (and cut)."""


@dataclass
class Predictions:
    labels: list[str]
    probability: np.ndarray
    """Probability of the predicted label."""
    probabilities: np.ndarray
    """(inputs, classes): every class's probability."""
    truncated: int


class TextClassifier:
    """A saved fp8exp classifier and its tokenizer. The model runs with training=False
    (`predict_on_batch`), so FP8 scales stay as trained. The reference classifier takes padded ids,
    a keras-hub family's classifier {"token_ids", "padding_mask"} (the mask marks non-[PAD] ids)."""

    def __init__(self, model, meta: dict, files: dict[str, list[str]] | None = None):
        self.model = model
        self.meta = meta
        self.tokens = Tokens(meta, files or {})

    @classmethod
    def load(cls, directory: str | Path) -> TextClassifier:
        """From an MLflow model directory (`model/`) or its `artifacts/` folder."""
        from . import load

        model = load(directory)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {model.meta['task']} model, not a classifier")
        return model

    @property
    def vocabulary(self) -> list[str] | None:
        return self.tokens.vocabulary

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def sequence_length(self) -> int:
        return self.meta["sequence_length"]

    @property
    def takes_token_ids(self) -> bool:
        return self.tokens.takes_token_ids

    def encode(self, texts: list[str]) -> Encoded:
        """Token ids padded or truncated to the sequence length, as training prepared them."""
        return Encoded(*self.tokens.padded(texts, self.sequence_length))

    def model_inputs(self, ids: np.ndarray):
        """What the Keras model takes for these padded ids."""
        if self.meta["keras_inputs"] == IDS_AND_MASK:
            return {"token_ids": ids, "padding_mask": ids != PAD}
        return ids

    def probabilities(self, ids: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """(inputs, classes) probabilities; the sigmoid head's one unit becomes [1 - p, p]."""
        outputs = [np.asarray(self.model.predict_on_batch(self.model_inputs(ids[start:start + batch_size])), np.float32)
                   for start in range(0, len(ids), batch_size)]
        out = np.concatenate(outputs)
        return np.concatenate([1 - out, out], axis=1) if out.shape[1] == 1 else out

    def classify(self, texts: list[str]) -> Predictions:
        encoded = self.encode(texts)
        probabilities = self.probabilities(encoded.ids)
        best = probabilities.argmax(axis=1)
        return Predictions([self.class_names[i] for i in best], probabilities[np.arange(len(best)), best],
                           probabilities, encoded.truncated)
