"""Documents -> fixed-length training windows for causal language modelling (task=causal_lm).

Each split's documents (token-id arrays) are joined end to end, each followed by one end-of-text
token, and cut into consecutive windows of `window` = data.sequence_length + 1 tokens: the model
reads tokens [0, L) of a window and predicts tokens [1, L] (families.causal_lm_batch). No padding:
the tail shorter than one window is dropped, so a split of T tokens (end-of-text tokens included)
gives exactly T // window windows. Splits are packed separately, so no window holds tokens of two
splits. Pure numpy.

    windows = pack(documents, window=129, end_of_text=eot)   # (T // 129, 129) int32
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fp8exp.config import ConfigError


def pack(documents: Sequence[np.ndarray], window: int, end_of_text: int) -> np.ndarray:
    """Join `documents`, each followed by `end_of_text`, and cut the stream into (n, window) int32
    windows, dropping the tail shorter than a window; (0, window) when there is not one window."""
    if window < 2:
        raise ValueError(f"window {window}: needs at least 2 tokens (one input, one label)")
    parts = []
    for document in documents:
        parts.append(np.asarray(document, np.int32).ravel())
        parts.append(np.asarray([end_of_text], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    count = len(stream) // window
    return stream[:count * window].reshape(count, window)


def pack_splits(documents: dict[str, Sequence[np.ndarray]], sequence_length: int, end_of_text: int,
                min_train_windows: int = 1) -> dict[str, np.ndarray]:
    """pack() each split (train / validation / test) into windows of sequence_length + 1 tokens.
    A split that cannot fill one window (training: `min_train_windows`) is a ConfigError naming
    data.sequence_length and how many tokens the split has."""
    window = sequence_length + 1
    packed = {split: pack(docs, window, end_of_text) for split, docs in documents.items()}
    for split, windows in packed.items():
        needed = min_train_windows if split == "train" else 1
        if len(windows) < needed:
            tokens = sum(len(np.asarray(doc).ravel()) + 1 for doc in documents[split])
            raise ConfigError("data.sequence_length", f"the {split} split has {tokens} tokens, too few to fill "
                              f"{needed} window(s) of data.sequence_length + 1 = {window} tokens; use a shorter "
                              "data.sequence_length or more text")
    return packed
