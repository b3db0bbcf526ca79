"""Datasets, all delivered the same way: token-id arrays padded to the sequence length, integer
labels and class names (task=classify), or packed windows of sequence_length + 1 tokens
(task=causal_lm, see packing.py). Every source (`data.name`) turns into `Splits`; nothing downstream
knows where the text came from."""

from __future__ import annotations

import dataclasses
import hashlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


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
    vocabulary: list[str] | None = None
    """Tokens by id, for sources of real text: WordPiece (task=classify) or byte-level BPE (causal_lm)."""
    merges: list[str] | None = None
    """The BPE merge rules ("a b", in rank order) that rebuild the tokenizer with `vocabulary`
    (bpe.keras_tokenizer); None for WordPiece and generated data."""
    notes: dict[str, int] = field(default_factory=dict)
    """Counts from preparation worth logging: undecodable files, dropped rows."""
    cache_hit: bool = False
    source_name: str = "unnamed"
    """What the data is, for the MLflow dataset names: `imdb`, the table file's name, the text_dir
    folder's name, `synthetic` (set by load())."""
    source_uri: str | None = None
    """Where it came from: a local path or the download URL; None for generated data."""
    task: str = "classify"
    """classify: x_* are (n, sequence_length) padded ids, y_* labels. causal_lm: x_* are packed
    (n, sequence_length + 1) windows (packing.py), y_* zeros (unused; the labels are the windows
    shifted by one), class_names empty."""

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identity of exactly these splits, from their content (token ids, labels, vocabulary, class
        names): the same data on any machine, cache or path gives the same one, and any change (a
        split cut to fit the devices, another tokenization) another. The MLflow datasets' digest."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update("\n".join(self.vocabulary or []).encode())
        if self.merges is not None:  # WordPiece splits keep the digests they had
            digest.update(b"\0merges\0" + "\n".join(self.merges).encode())
        digest.update("\n".join(self.class_names).encode())
        return digest.hexdigest()[:20]

    @property
    def tokenizer(self) -> str | None:
        """bpe | wordpiece | None (generated token ids): what turns text into these ids."""
        return "bpe" if self.merges is not None else "wordpiece" if self.vocabulary else None

    @property
    def end_of_text_id(self) -> int | None:
        """task=causal_lm: the id packing puts after each document, the last one (BPE: bpe.END_OF_TEXT)."""
        return self.vocabulary_size - 1 if self.task == "causal_lm" else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sequence_length(self) -> int:
        """Tokens the model reads per example (a causal_lm window holds one more: the last label)."""
        return self.x_train.shape[1] - (self.task == "causal_lm")

    def divisible_by(self, ways: int) -> "Splits":
        """Each split cut to a multiple of `ways`, so every batch, the last one too, splits
        evenly over the devices of a data-parallel batch axis."""
        if ways == 1:
            return self
        cut = {name: len(getattr(self, name)) // ways * ways for name in ("y_train", "y_val", "y_test")}
        return dataclasses.replace(
            self, x_train=self.x_train[:cut["y_train"]], y_train=self.y_train[:cut["y_train"]],
            x_val=self.x_val[:cut["y_val"]], y_val=self.y_val[:cut["y_val"]],
            x_test=self.x_test[:cut["y_test"]], y_test=self.y_test[:cut["y_test"]])

    def metrics(self) -> dict[str, float]:
        """`data/` metrics: split sizes, examples per class in training, preparation notes."""
        metrics = {"data/num_train": len(self.y_train), "data/num_validation": len(self.y_val),
                   "data/num_test": len(self.y_test), "data/num_classes": self.num_classes}
        if self.task == "causal_lm":  # windows, not examples; and the tokens the model learns from
            metrics["data/train_tokens"] = int(len(self.y_train) * self.sequence_length)
            metrics.update({f"data/{key}": value for key, value in self.notes.items()})
            return metrics
        counts = np.bincount(self.y_train, minlength=self.num_classes)
        metrics.update({f"data/train_class_{i}": int(c) for i, c in enumerate(counts)})
        metrics.update({f"data/{key}": value for key, value in self.notes.items()})
        return metrics

    def dataset_summary(self) -> dict:
        """What the tracker logs as the run's MLflow datasets, as plain values (tracking does not
        import data): name, digest, source, and per split (train/validation/test) its size and
        examples per class."""
        splits = {}
        for context, labels in (("train", self.y_train), ("validation", self.y_val), ("test", self.y_test)):
            counts = np.bincount(labels, minlength=self.num_classes)
            splits[context] = {"num_rows": len(labels),
                               "class_counts": {name: int(c) for name, c in zip(self.class_names, counts)}}
        return {"name": self.source_name, "digest": self.fingerprint, "source": self.source_uri, "splits": splits,
                "sequence_length": self.sequence_length, "token_dtype": str(self.x_train.dtype),
                "label_dtype": str(self.y_train.dtype)}


TOKENIZERS = {"classify": "wordpiece", "causal_lm": "bpe"}
"""What each task's real text is tokenized with: WordPiece as the reference classifier example
(tokenize.py); byte-level BPE for language models, which must write any text back (bpe.py)."""


def load(data: DictConfig, task: str = "classify") -> Splits:
    """The seam every data source plugs into: synthetic data is generated, real text is
    read, tokenized and cached under a fingerprint of the source and the settings (and the task:
    causal_lm packs the text into windows, see packing.py)."""
    if data.name == "synthetic":
        from fp8exp.data.synthetic import generate_lm_splits, generate_splits
        return generate_lm_splits(data) if task == "causal_lm" else generate_splits(data)

    from fp8exp.data import cache, imdb, sources

    if data.name == "table":
        path = Path(data.path).expanduser()
        read = functools.partial(sources.read_table, path, data)
        source_id = sources.file_identity(path) if path.is_file() else None
        source = {"source_name": path.name, "source_uri": str(path.resolve())}
    else:
        root = imdb.dataset_dir(data) if data.name == "imdb" else Path(data.path).expanduser()
        read = functools.partial(sources.read_text_dir, root, data)
        source_id = sources.directory_identity(root) if root.is_dir() else None
        source = ({"source_name": "imdb", "source_uri": str(root.resolve()) if data.path else data.url}
                  if data.name == "imdb" else {"source_name": root.resolve().name, "source_uri": str(root.resolve())})
    prepare = read_and_pack if task == "causal_lm" else read_and_prepare
    if source_id is None:
        return prepare(read, data)  # raises the reader's clear error about the path

    entry = cache.entry_dir(cache.cache_root(data.cache_dir), data.name, cache_key(data, task, source_id))
    stored = cache.load(entry)
    if stored is not None:
        arrays, vocabulary, merges, meta = stored
        log.info("Using prepared %s data from %s", data.name, entry)
        return Splits(**arrays, class_names=meta["class_names"], vocabulary_size=len(vocabulary),
                      vocabulary=vocabulary, merges=merges, notes=meta["notes"], cache_hit=True,
                      task=meta.get("task", "classify"), **source)
    splits = dataclasses.replace(prepare(read, data), **source)
    cache.store(entry, {name: getattr(splits, name) for name in cache.ARRAYS}, splits.vocabulary,
                {"class_names": splits.class_names, "notes": splits.notes, "task": splits.task,
                 "tokenizer": splits.tokenizer}, merges=splits.merges)
    log.info("Prepared %s data cached in %s", data.name, entry)
    return splits


def cache_key(data: DictConfig, task: str, source_id: list, tokenizer: str | None = None) -> str:
    """The cache key of a source's splits: its identity and every setting that shapes them, the task
    and the tokenizer (default: the task's, TOKENIZERS) among them, so WordPiece and BPE entries never
    mix. Keys made before the task or BPE existed (classify; WordPiece) stay as they were."""
    from fp8exp.data import cache

    # Where the source lives and how big a download may be do not shape the splits; data.sha256
    # (the archive's identity) does, and stays in.
    settings = {k: v for k, v in OmegaConf.to_container(data).items()
                if k not in ("cache_dir", "path", "url", "max_download_bytes")}
    if task != "classify":
        settings["task"] = task
    if (tokenizer or TOKENIZERS[task]) != "wordpiece":
        settings["tokenizer"] = tokenizer or TOKENIZERS[task]
    return cache.fingerprint(source_id, settings)


def read_and_prepare(read, data: DictConfig) -> Splits:
    """Raw text -> WordPiece vocabulary (training split only) -> token ids."""
    from fp8exp.data import tokenize

    raw = read()
    if data.lowercase:
        raw.texts = {split: [t.lower() for t in texts] for split, texts in raw.texts.items()}
    vocabulary = tokenize.train_vocabulary(raw.texts["train"], data.vocabulary_size)
    # All splits in one call: one tokenizer, and one hand-over of long-word texts to keras-hub.
    ids = tokenize.encode([text for texts in raw.texts.values() for text in texts], vocabulary, data.sequence_length)
    ends = np.cumsum([len(texts) for texts in raw.texts.values()])
    x = dict(zip(raw.texts, np.split(ids, ends[:-1]), strict=True))
    return Splits(x["train"], raw.labels["train"], x["validation"], raw.labels["validation"],
                  x["test"], raw.labels["test"], class_names=raw.class_names,
                  vocabulary_size=len(vocabulary), vocabulary=vocabulary, notes=raw.notes)


def read_and_pack(read, data: DictConfig) -> Splits:
    """task=causal_lm: raw text only (labels unused) -> byte-level BPE vocabulary and merges (training
    split only; bpe.END_OF_TEXT the last id) -> each split's documents tokenized in full and packed
    into windows of data.sequence_length + 1 tokens, END_OF_TEXT after each (packing.pack_splits)."""
    from fp8exp.data import bpe, packing

    raw = read()
    texts = {split: [t.lower() for t in items] if data.lowercase else list(items) for split, items in raw.texts.items()}
    vocabulary, merges = bpe.train(texts["train"], data.vocabulary_size)
    documents = {split: bpe.encode(items, vocabulary, merges) for split, items in texts.items()}
    windows = packing.pack_splits(documents, data.sequence_length, end_of_text=vocabulary.index(bpe.END_OF_TEXT))
    return lm_splits(windows, len(vocabulary), vocabulary=vocabulary, merges=merges, notes=raw.notes)


def lm_splits(windows: dict[str, np.ndarray], vocabulary_size: int, **fields) -> Splits:
    """Splits of packed windows (task=causal_lm); the y arrays are placeholders of the same length."""
    zeros = {split: np.zeros(len(w), np.int32) for split, w in windows.items()}
    return Splits(windows["train"], zeros["train"], windows["validation"], zeros["validation"],
                  windows["test"], zeros["test"], class_names=[], vocabulary_size=vocabulary_size,
                  task="causal_lm", **fields)
