"""A run's saved model as inference runs it: read its files (files.py), tokenize as training did
(tokens.py), then classify (classify.py, task=classify) or generate text (generate.py,
task=causal_lm). `python -m fp8exp.predict`, `python -m fp8exp.infer_bench` and the MLflow pyfunc
model (serve/pyfunc.py) all load it through `load` / `from_artifacts`.

This package imports only the standard library, NumPy, pandas, Keras and keras-hub, and itself
through relative imports, never the rest of fp8exp: save.py ships it with every MLflow model
(`code_paths`: code/textmodel/, beside code/pooling.py for the families' pooling layer and
code/recipes/ for the FP8 recipe layers), so a saved model serves without fp8exp installed.

The run's LoggedModel `model` (`models:/<model_id>`, `runs:/<run_id>/model`; or, for runs saved
offline or before fp8exp logged models, the run's plain artifact `model/`) is an MLflow model directory:

    MLmodel, pyfunc.py ...           MLflow's files; pyfunc.py is a copy of serve/pyfunc.py
    code/textmodel/, code/pooling.py this package and fp8exp/models/pooling.py
    code/recipes/                    fp8exp/precision/recipes/ (RecipeDense, RecipeEinsumDense)
    artifacts/model.keras            the trained model, without optimizer state
    artifacts/fp8exp_model.json      format, versions, task, precision, tokenizer, lengths, class
                                     names or end-of-text id, which layers are quantized and how,
                                     which run an FP8 recipe and its options
    artifacts/vocabulary.txt         the tokenizer's vocabulary (real-text runs only)
    artifacts/merges.txt             and its BPE merges (language models on real text)
"""

from __future__ import annotations

from pathlib import Path

from .classify import Predictions, TextClassifier
from .files import (
    ARTIFACT_PATH,
    FORMAT,
    KERAS_FILE,
    MERGES_FILE,
    META_FILE,
    TOKENIZER_FILES,
    VOCABULARY_FILE,
    InputError,
    ModelFileError,
    input_texts,
    load_keras,
    read_meta,
    tokenizer_files,
)
from .generate import SAMPLERS, Generation, Settings, TextGenerator, check_settings

__all__ = ["ARTIFACT_PATH", "FORMAT", "KERAS_FILE", "MERGES_FILE", "META_FILE", "SAMPLERS", "TOKENIZER_FILES",
           "VOCABULARY_FILE", "Generation", "InputError", "ModelFileError", "Predictions", "Settings",
           "TextClassifier", "TextGenerator", "artifacts_in", "check_settings", "from_artifacts", "input_texts", "load",
           "load_keras", "read_meta"]


def artifacts_in(directory: str | Path) -> dict[str, str]:
    """MLflow artifact name -> file, for an MLflow model directory (`model/`) or its `artifacts/`."""
    directory = Path(directory)
    if (directory / "artifacts").is_dir():
        directory = directory / "artifacts"
    return {"keras_model": str(directory / KERAS_FILE), "meta": str(directory / META_FILE),
            "vocabulary": str(directory / VOCABULARY_FILE), "merges": str(directory / MERGES_FILE)}


def from_artifacts(artifacts: dict[str, str]) -> TextClassifier | TextGenerator:
    """The model and its tokenizer from MLflow's artifact paths (names as save.py gives them)."""
    meta = read_meta(Path(artifacts["meta"]))
    files = tokenizer_files(meta, artifacts)
    model = load_keras(Path(artifacts["keras_model"]), meta)
    return (TextGenerator if meta["task"] == "causal_lm" else TextClassifier)(model, meta, files)


def load(directory: str | Path) -> TextClassifier | TextGenerator:
    return from_artifacts(artifacts_in(directory))
