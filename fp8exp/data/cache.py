"""Prepared splits on disk, keyed by a fingerprint of the source and of every setting that
shapes them, so a sweep over precisions or model sizes tokenizes its data once. Entries
are written to a temporary directory and renamed into place: a crash never leaves an entry
that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fp8exp.config import ConfigError

FORMAT_VERSION = 2  # bump when what is stored, or how text is tokenized, changes
ARRAYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def cache_root(cache_dir: str | None) -> Path:
    """`data.cache_dir`, else $FP8EXP_CACHE_DIR, else ~/.cache/fp8exp; must be writable."""
    root = Path(cache_dir or os.environ.get("FP8EXP_CACHE_DIR") or Path.home() / ".cache" / "fp8exp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as error:
        raise ConfigError("data.cache_dir", f"{root} is not a writable directory ({error.strerror}); "
                          "point data.cache_dir or FP8EXP_CACHE_DIR somewhere writable") from None
    return root


def fingerprint(*parts) -> str:
    payload = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def entry_dir(root: Path, name: str, key: str) -> Path:
    return root / "prepared" / f"{name}-{key}"


def load(entry: Path) -> tuple[dict[str, np.ndarray], list[str], list[str] | None, dict] | None:
    """Arrays, vocabulary, BPE merges (None for WordPiece) and metadata of a complete entry, or None."""
    if not (entry / "meta.json").is_file():
        return None
    with np.load(entry / "splits.npz") as stored:
        arrays = {name: stored[name] for name in ARRAYS}
    vocabulary = (entry / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    merges = None
    if (entry / "merges.txt").is_file():
        text = (entry / "merges.txt").read_text(encoding="utf-8")
        merges = text.split("\n") if text else []  # a text too small to merge anything leaves none
    return arrays, vocabulary, merges, json.loads((entry / "meta.json").read_text())


def store(entry: Path, arrays: dict[str, np.ndarray], vocabulary: list[str], meta: dict,
          merges: list[str] | None = None) -> None:
    """One entry; merges.txt only for a BPE tokenizer. Tokens never hold a newline: WordPiece words
    are split at whitespace, byte-level tokens spell a newline as `Ċ`."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=entry.parent))
    try:
        np.savez(staging / "splits.npz", **arrays)
        (staging / "vocabulary.txt").write_text("\n".join(vocabulary), encoding="utf-8")
        if merges is not None:
            (staging / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        try:
            staging.rename(entry)
        except OSError:  # another job stored the same entry first: theirs is as good as ours
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
