"""A saved model's files as inference reads them: the metadata, the tokenizer files and the
`.keras` file (rebuilt with its FP8 state), and the checks on what a request hands in.

Why not `keras.saving.load_model`: keras-hub's TransformerDecoder builds its Dense/EinsumDense
sublayers under its own (unquantized) policy, so a reloaded FP8 model has no place for their
scales and amax histories and loading fails. `load_keras` rebuilds the architecture from the
file's config, gives every layer recorded as quantized its saved dtype policy again, then loads
every variable from the same file: weights, FP8 scales and amax histories, bit for bit. Layers an
FP8 recipe ran in come back as recipe layers the same way (`recipe_layers`: their registered class,
which the caller imports first, and their recipe); the recipes scale from the current tensors, so
the reloaded model computes what the trained one did."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")  # when served without fp8exp, which sets it too

FORMAT = 2
"""Layout version of the saved model (2: the task, tokenizer and generation fields)."""
RECIPE_FORMAT = 3
"""A model with FP8 recipe layers (`recipe_layers`): an fp8exp that reads only formats 1-2 would
load those layers as plain Dense and compute something else, so it must refuse the model."""
READABLE_FORMATS = (1, 2, 3)
"""Format 1 (classifiers saved before language models) reads as task=classify."""
ARTIFACT_PATH = "model"
KERAS_FILE = "model.keras"
META_FILE = "fp8exp_model.json"
VOCABULARY_FILE = "vocabulary.txt"
MERGES_FILE = "merges.txt"
TOKENIZER_FILES = {"wordpiece": {"vocabulary": VOCABULARY_FILE},
                   "bpe": {"vocabulary": VOCABULARY_FILE, "merges": MERGES_FILE}}
"""What each tokenizer kind is rebuilt from: MLflow artifact name -> file in artifacts/."""
TASKS = ("classify", "causal_lm")
PAD = 0
IDS_AND_MASK = "token_ids+padding_mask"
"""meta["keras_inputs"] of a keras-hub model: {"token_ids", "padding_mask"} (mask = ids != PAD)."""


class ModelFileError(Exception):
    """The saved model cannot be used; the message says which file and why."""


class InputError(ValueError):
    """Input the model cannot take (empty, not token ids for a synthetic run, a bad setting)."""


def read_meta(path: Path) -> dict:
    """fp8exp_model.json, with format 1's missing fields filled in as they were."""
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: this is not a model saved by fp8exp") from None
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{path} is unreadable or corrupt ({error})") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise ModelFileError(f"{path} is not fp8exp model metadata")
    if meta["format"] not in READABLE_FORMATS:
        raise ModelFileError(
            f"the model was saved by fp8exp {meta.get('fp8exp_version', '?')} in model format {meta['format']}; "
            f"this fp8exp reads formats {', '.join(map(str, READABLE_FORMATS))}: use the fp8exp version that "
            "trained it, or train again")
    meta.setdefault("task", "classify")
    meta.setdefault("tokenizer", "wordpiece" if meta.get("input") == "text" else None)
    meta.setdefault("keras_inputs", "token_ids")
    if meta["task"] not in TASKS:
        raise ModelFileError(f"{path}: unknown task {meta['task']!r}; this fp8exp serves {', '.join(TASKS)}")
    return meta


def read_lines(path, what: str, count: int | None = None) -> list[str]:
    """One entry per "\n"-ended line; not splitlines(): U+2028 and U+2029 can be inside tokens."""
    if path is None or not Path(path).is_file():
        raise ModelFileError(f"{Path(path).name if path else what} is missing: this model's tokenizer needs its {what}")
    text = Path(path).read_text(encoding="utf-8")
    lines = text.removesuffix("\n").split("\n") if text else []  # no merges: an empty file
    if count is not None and len(lines) != count:
        raise ModelFileError(f"{path} has {len(lines)} tokens, the model {count}: the files do not belong together")
    return lines


def tokenizer_files(meta: dict, artifacts: dict) -> dict[str, list[str]]:
    """The tokenizer's files named in `artifacts` (MLflow artifact name -> path), read: for
    WordPiece the vocabulary, for BPE the vocabulary and merges, nothing for token-id models."""
    wanted = TOKENIZER_FILES.get(meta["tokenizer"], {}) if meta["input"] == "text" else {}
    return {name: read_lines(artifacts.get(name), name, meta["vocabulary_size"] if name == "vocabulary" else None)
            for name in wanted}


def recipe_classes(meta: dict) -> dict:
    """Layer path -> the registered recipe layer class that meta["recipe_layers"] names for it."""
    import keras

    classes = {}
    for layer_path, entry in meta.get("recipe_layers", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("recipe"), dict) or "class_name" not in entry:
            raise ModelFileError(f"{META_FILE}: recipe_layers[{layer_path!r}] is {entry!r}, "
                                 "not a layer class and its recipe")
        classes[layer_path] = keras.saving.get_registered_object(entry["class_name"])
        if classes[layer_path] is not None and not hasattr(classes[layer_path], "adopt"):
            raise ModelFileError(f"{META_FILE}: recipe_layers[{layer_path!r}] names {entry['class_name']}, "
                                 "which is not an FP8 recipe layer class")
        if classes[layer_path] is None:
            raise ModelFileError(
                f"layer {layer_path!r} runs FP8 recipe {entry['recipe'].get('name')!r} in class {entry['class_name']}, "
                "which is not registered: import the model's code/recipes/layers.py (the pyfunc model does) or "
                "fp8exp.precision.recipes.layers first")
    return classes


def load_keras(path: Path, meta: dict):
    """Rebuild from the file's config, re-apply the saved quantized policies and recipe layers, load
    every variable. Custom layers (fp8exp>SequencePooling, fp8exp>RecipeDense, ...) must be registered
    first: importing their module does it."""
    import keras
    import keras_hub  # noqa: F401  (registers TokenAndPositionEmbedding, TransformerDecoder, the CausalLMs)

    path = Path(path)
    recipes = recipe_classes(meta)
    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json").decode("utf-8")
        # Under the policy it was built under: a keras-hub Task's config omits its own (the CausalLM's
        # cache dtype), and it would take the global one.
        previous = keras.config.dtype_policy()
        with warnings.catch_warnings():  # a keras-hub CausalLM: "compile() was not called as part of loading"
            warnings.simplefilter("ignore")
            keras.config.set_dtype_policy(meta.get("dtype_policy") or previous)
            try:
                model = keras.models.model_from_json(config)
            finally:
                keras.config.set_dtype_policy(previous)
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing") from None
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path} is corrupt or not a Keras model ({type(error).__name__}: {error})") from None
    layers = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
    for layer_path, policy in meta.get("quantized_layers", {}).items():
        if layer_path not in layers:
            raise ModelFileError(f"{path} has no layer {layer_path!r} that its metadata says is quantized")
        layer = layers[layer_path]
        wanted = keras.dtype_policies.deserialize(policy)
        if layer.dtype_policy.name != wanted.name:
            layer.dtype_policy = wanted  # quantizes the built layer: adds scales and histories
    for layer_path, recipe_class in recipes.items():
        if layer_path not in layers:
            raise ModelFileError(f"{path} has no layer {layer_path!r} that its metadata says runs an FP8 recipe")
        entry = meta["recipe_layers"][layer_path]
        try:  # a layer a keras-hub block rebuilt as plain Dense/EinsumDense (the config restored the others)
            recipe_class.adopt(layers[layer_path], entry["recipe"], entry.get("track_scales", True))
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{path}: layer {layer_path!r} cannot run its FP8 recipe again ({error})") from None
    try:
        model.load_weights(path)
    except Exception as error:  # h5py and Keras raise many kinds for a damaged weights file
        raise ModelFileError(f"{path}: its weights cannot be loaded ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return model


def check_texts(texts: list) -> None:
    """Refuse no texts, and name the rows (from 0) that are null, not strings or empty: the model
    would otherwise answer them with a confident label or a continuation of nothing."""
    import pandas as pd

    if not texts:
        raise InputError("no input: give at least one text")
    problems = []
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            null = pd.api.types.is_scalar(text) and pd.isna(text)
            problems.append(f"row {row}: text is {'null' if null else type(text).__name__ + ', not a string'}")
        elif not text.strip():
            problems.append(f"row {row}: text is empty")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise InputError(f"{', '.join(problems[:5])}{more}; give every row a non-empty string")


def input_texts(model_input) -> list:
    """The texts of any input MLflow hands over, one per row or item: a DataFrame with a column
    `text` (or one unnamed column), a Series, a list or array, one string, {"text": [...]} or
    {"text": "one"} (the signature declares no input schema; see save.signature)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            model_input = model_input["text"]
        elif list(model_input.columns) == [0]:  # `dataframe_split` without columns, pd.DataFrame(list)
            model_input = model_input[0]
        else:
            raise InputError(f"expected a column 'text', got columns {list(model_input.columns)}")
    elif isinstance(model_input, dict):
        if "text" not in model_input:
            raise InputError(f"expected a key 'text', got keys {list(model_input)}")
        model_input = model_input["text"]
    if isinstance(model_input, str):
        return [model_input]
    return list(np.asarray(model_input, dtype=object).ravel())
