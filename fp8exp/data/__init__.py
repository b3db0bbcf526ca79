"""Datasets, all delivered the same way: token-id arrays padded to the sequence length, integer
labels and class names. Every source (`data.name`) turns into `Splits`; nothing downstream
knows where the text came from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig


@dataclass
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    vocabulary_size: int
    """Size of the embedding table: every token id is below it."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sequence_length(self) -> int:
        return self.x_train.shape[1]

    def sizes(self) -> dict[str, float]:
        """`data/` metrics: how many examples each split holds."""
        return {"data/num_train": len(self.y_train), "data/num_validation": len(self.y_val),
                "data/num_test": len(self.y_test)}


def load(data: DictConfig) -> Splits:
    """The seam every data source plugs into."""
    if data.name == "synthetic":
        from fp8exp.data.synthetic import generate_splits
        return generate_splits(data)
    raise ValueError(f"data.name: unknown dataset {data.name!r}")
