"""Raw labelled text from the places users keep it: a directory in the aclImdb layout
(`<split>/<class>/*.txt`) or a table file. Every reader returns `RawSplits`; tokenizing and
caching happen elsewhere. Problems with the data are ConfigErrors naming the setting to fix."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fp8exp.config import ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


@dataclass
class RawSplits:
    texts: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    notes: dict[str, int] = field(default_factory=dict)
    """Counts worth a line in the log and a metric: undecodable files, dropped rows."""


def carve(count: int, test_fraction: float | None, validation_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of a seeded split: test first (when asked for), then validation, rest train."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = int(round(count * test_fraction)) if test_fraction is not None else 0
    n_val = int(round(count * validation_fraction))
    return {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


# ---------------------------------------------------------------- directories of .txt files

def class_folders(split_dir: Path) -> list[str]:
    """Class folders of a split; `unsup` holds IMDB's unlabelled reviews, not a class."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name != "unsup")


def text_files(root: Path) -> list[Path]:
    """The files read_text_dir reads, found as keras.utils.text_dataset_from_directory finds them:
    every *.txt (any case) at any depth below each class folder of train/ and test/."""
    train_dir = root / "train"
    found = []
    for name in class_folders(train_dir) if train_dir.is_dir() else []:
        for split_dir in (train_dir, root / "test"):
            for folder, _, files in os.walk(split_dir / name):
                found.extend(Path(folder) / f for f in files if f.lower().endswith(".txt"))
    return sorted(found)


def directory_identity(root: Path) -> list:
    """Cheap content identity of a text directory: path, size and mtime of every file it reads."""
    digest = hashlib.sha256()
    for path in text_files(root):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return [str(root.resolve()), digest.hexdigest()]


def _decode(raw: list[bytes], notes: dict[str, int]) -> list[str]:
    texts = []
    for item in raw:
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError:
            notes["undecodable_files"] = notes.get("undecodable_files", 0) + 1
            texts.append(item.decode("utf-8", errors="replace"))
    return texts


def _read_split(split_dir: Path, class_names: list[str], notes: dict[str, int], **split_args):
    """keras.utils.text_dataset_from_directory, as the reference example reads IMDB."""
    import keras

    datasets = keras.utils.text_dataset_from_directory(
        str(split_dir), class_names=class_names, batch_size=None, verbose=False, **split_args)
    result = []
    for dataset in datasets if isinstance(datasets, list) else [datasets]:
        raw, labels = [], []
        for texts, batch_labels in dataset.batch(2048).as_numpy_iterator():
            raw.extend(texts)
            labels.append(batch_labels)
        result.append((_decode(raw, notes), np.concatenate(labels).astype(np.int32) if labels
                       else np.zeros(0, np.int32)))
    return result


def read_text_dir(root: Path, data: DictConfig) -> RawSplits:
    train_dir = root / "train"
    if not root.is_dir():
        raise ConfigError("data.path", f"{root} does not exist or is not a directory")
    if not train_dir.is_dir():
        raise ConfigError("data.path", f"{root} has no train/ folder; expected <path>/train/<class>/*.txt")
    class_names = class_folders(train_dir)
    if len(class_names) < 2:
        found = f"only {class_names[0]!r}" if class_names else "none"
        raise ConfigError("data.path", f"{train_dir} needs at least two class folders, found {found}")
    for split_dir in (train_dir, root / "test"):
        for name in class_names if split_dir.is_dir() else []:
            if not any((split_dir / name).glob("*.txt")):
                raise ConfigError("data.path", f"class folder {split_dir / name} has no .txt files")

    notes: dict[str, int] = {}
    texts, labels = {}, {}
    if (root / "test").is_dir():
        (texts["train"], labels["train"]), (texts["validation"], labels["validation"]) = _read_split(
            train_dir, class_names, notes, validation_split=data.validation_fraction,
            subset="both", seed=data.split_seed)
        [(texts["test"], labels["test"])] = _read_split(root / "test", class_names, notes, shuffle=False)
    else:
        [(all_texts, all_labels)] = _read_split(train_dir, class_names, notes, shuffle=False)
        for split, index in carve(len(all_texts), data.test_fraction, data.validation_fraction,
                                  data.split_seed).items():
            texts[split] = [all_texts[i] for i in index]
            labels[split] = all_labels[index]
    if notes.get("undecodable_files"):
        log.warning("%d files were not valid UTF-8; decoded with U+FFFD replacement characters",
                    notes["undecodable_files"])
    return RawSplits(texts, labels, class_names, notes)


# ---------------------------------------------------------------- tables

TABLE_FORMATS = (".csv", ".tsv", ".parquet", ".jsonl", ".json")


def read_table_file(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ConfigError("data.path", f"{path.name}: unsupported format {suffix!r}; "
                          f"valid: {', '.join(TABLE_FORMATS)}")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=True)
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as error:  # pandas/pyarrow raise many types for a malformed file
        raise ConfigError("data.path", f"cannot read {path} as {suffix[1:]}: {error}") from None


def file_identity(path: Path) -> list:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return [path.name, digest.hexdigest()]


def _sorted_labels(values) -> list:
    try:
        return sorted(values, key=float)
    except (TypeError, ValueError):
        return sorted(values, key=str)


def read_table(path: Path, data: DictConfig) -> RawSplits:
    if not path.is_file():
        raise ConfigError("data.path", f"{path} does not exist or is not a file")
    frame = read_table_file(path)
    for key in ("text_column", "label_column", "split_column"):
        column = data.get(key)
        if column is not None and column not in frame.columns:
            raise ConfigError(f"data.{key}", f"no column {column!r} in {path.name}; "
                              f"columns: {', '.join(map(str, frame.columns))}")

    notes: dict[str, int] = {}
    missing_text = frame[data.text_column].isna() | frame[data.label_column].isna()
    if missing_text.any():
        notes["dropped_rows_missing_values"] = int(missing_text.sum())
        frame = frame[~missing_text]
    labels_as_text = frame[data.label_column].astype(str)
    if data.classes is not None:
        class_names = [str(c) for c in data.classes]
        present = set(labels_as_text)
        absent = [c for c in class_names if c not in present]
        if absent:
            raise ConfigError("data.classes", f"{', '.join(absent)} never occur(s) in column "
                              f"{data.label_column!r}; values there: {', '.join(_sorted_labels(present)[:20])}")
        keep = labels_as_text.isin(class_names)
        if not keep.all():
            notes["dropped_rows_other_labels"] = int((~keep).sum())
            frame, labels_as_text = frame[keep], labels_as_text[keep]
    else:
        class_names = [str(v) for v in _sorted_labels(frame[data.label_column].unique())]
    if len(class_names) < 2:
        raise ConfigError("data.label_column", f"column {data.label_column!r} holds a single class "
                          f"({class_names[0] if class_names else 'none'}); need at least two")

    texts = frame[data.text_column].astype(str).tolist()
    labels = labels_as_text.map({name: i for i, name in enumerate(class_names)}).to_numpy(np.int32)
    if data.split_column is not None:
        split_of = frame[data.split_column].astype(str).to_numpy()
        unknown = sorted(set(split_of) - set(SPLITS))
        if unknown:
            raise ConfigError("data.split_column", f"values {', '.join(unknown[:5])} are not one of "
                              f"{', '.join(SPLITS)}")
        index = {split: np.flatnonzero(split_of == split) for split in SPLITS}
    else:
        index = carve(len(texts), data.test_fraction, data.validation_fraction, data.split_seed)
    for split in SPLITS:
        if len(index[split]) == 0:
            raise ConfigError("data.path", f"{path.name} leaves the {split} split empty")
    for reason, count in notes.items():
        log.warning("%s: dropped %d rows (%s)", path.name, count, reason.replace("_", " "))
    return RawSplits({s: [texts[i] for i in index[s]] for s in SPLITS},
                     {s: labels[index[s]] for s in SPLITS}, class_names, notes)
