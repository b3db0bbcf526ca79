"""A text-classification task that needs no download: random token sequences in which each
class plants its own marker tokens (plus a few of another class's, so the model must weigh
evidence rather than spot one token). Deterministic for a seed and learnable well above chance."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from fp8exp.data import Splits, lm_splits
from fp8exp.data.packing import pack_splits

FIRST_TOKEN = 2  # 0 pads, 1 is the unknown token, as with a WordPiece vocabulary


def generate(rng: np.random.Generator, n: int, data: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    vocab, length, classes, markers = (data.vocabulary_size, data.sequence_length,
                                       data.num_classes, data.signal_tokens)
    labels = rng.integers(0, classes, n)
    lengths = rng.integers(max(1, length // 2), length + 1, n)
    tokens = rng.integers(FIRST_TOKEN + classes * markers, vocab, size=(n, length))
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0

    distractors = max(1, markers // 4)
    other = (labels + rng.integers(1, classes, n)) % classes
    planted = np.concatenate([
        FIRST_TOKEN + labels[:, None] * markers + rng.integers(0, markers, (n, markers)),
        FIRST_TOKEN + other[:, None] * markers + rng.integers(0, markers, (n, distractors)),
    ], axis=1)
    positions = (rng.random(planted.shape) * lengths[:, None]).astype(np.int64)
    tokens[np.arange(n)[:, None], positions] = planted
    return tokens.astype(np.int32), labels.astype(np.int32)


def generate_splits(data: DictConfig) -> Splits:
    train_rng, val_rng, test_rng = (np.random.default_rng(s)
                                    for s in np.random.SeedSequence(data.seed).spawn(3))
    x_train, y_train = generate(train_rng, data.num_train, data)
    x_val, y_val = generate(val_rng, data.num_validation, data)
    x_test, y_test = generate(test_rng, data.num_test, data)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test,
                  class_names=[f"class_{i}" for i in range(data.num_classes)],
                  vocabulary_size=data.vocabulary_size, source_name="synthetic")


def generate_documents(rng: np.random.Generator, n: int, data: DictConfig) -> list[np.ndarray]:
    """task=causal_lm: `n` documents of data.sequence_length / 2 to 2 x data.sequence_length tokens,
    each an arithmetic progression (a random start and a stride in 1..4, wrapping within
    [FIRST_TOKEN, vocabulary_size - 1)): after two tokens the next is predictable, so the loss falls."""
    span = data.vocabulary_size - 1 - FIRST_TOKEN  # the last id is the end-of-text token
    length = data.sequence_length
    documents = []
    for _ in range(n):
        size = int(rng.integers(max(2, length // 2), 2 * length + 1))
        start, stride = int(rng.integers(0, span)), int(rng.integers(1, 5))
        documents.append((FIRST_TOKEN + (start + stride * np.arange(size)) % span).astype(np.int32))
    return documents


def generate_lm_splits(data: DictConfig) -> Splits:
    """data.num_train / num_validation / num_test documents (generate_documents), packed into
    windows of data.sequence_length + 1 tokens; end of text is id vocabulary_size - 1."""
    rngs = (np.random.default_rng(s) for s in np.random.SeedSequence([data.seed, 1]).spawn(3))
    counts = {"train": data.num_train, "validation": data.num_validation, "test": data.num_test}
    documents = {split: generate_documents(rng, counts[split], data) for split, rng in zip(counts, rngs)}
    windows = pack_splits(documents, data.sequence_length, end_of_text=data.vocabulary_size - 1)
    return lm_splits(windows, data.vocabulary_size, source_name="synthetic")
