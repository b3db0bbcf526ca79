"""A run's trained model as something that answers requests: the `.keras` file, the tokenizer
vocabulary and what inference must know about them, packaged as an MLflow pyfunc model that
takes raw strings. `python -m fp8exp.predict`, `python -m fp8exp.infer_bench` and
`mlflow models serve` all load it through `TextClassifier`; save.py writes it.

The run's LoggedModel `model` (`models:/<model_id>`, `runs:/<run_id>/model`; or, for runs saved
offline or before fp8exp logged models, the run's plain artifact `model/`) is an MLflow model directory:

    MLmodel, pyfunc.py ...           MLflow's files; pyfunc.py is a copy of this file
    artifacts/model.keras            the trained model, without optimizer state
    artifacts/fp8exp_model.json      format, versions, precision, sequence length, class names,
                                     which layers are quantized and with which dtype policy
    artifacts/vocabulary.txt         the WordPiece vocabulary (real-text runs only)

Inputs are strings. A synthetic run has no tokenizer: its inputs are token ids separated by
spaces ("5 17 33"). Longer inputs are truncated to the model's sequence length.

`mlflow.pyfunc.load_model(...).predict` and `mlflow models serve` give one prediction per text for
a DataFrame with a column `text` (or one unnamed column), a Series, a list or NumPy array of
strings, one string, and a dict {"text": [...]} or {"text": "one"}; over HTTP, `dataframe_split`,
`dataframe_records`, `inputs` and `instances`. The signature declares outputs only: MLflow's input
schema enforcement would refuse some of these or turn {"text": [a, b]} into one text (save.py
says which). A null (None, NaN) or empty text is refused, naming every such row (from 0): "row 1:
text is null, row 2: text is empty; ...", a 400 when served, since the model would answer "nan" or
nothing with a confident label.

This file is also the MLflow "model from code": it imports only the standard library, NumPy,
pandas, Keras, keras-hub and MLflow, never the rest of fp8exp, so the logged model serves
without fp8exp installed (`mlflow models serve -m models:/MODEL_ID --env-manager local`).

Why not `keras.saving.load_model`: keras-hub's TransformerDecoder builds its Dense/EinsumDense
sublayers under its own (unquantized) policy, so a reloaded FP8 model has no place for their
scales and amax histories and loading fails. The loader rebuilds the architecture from the
file's config, gives every layer recorded as quantized its saved dtype policy again, then loads
every variable from the same file: weights, FP8 scales and amax histories, bit for bit.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlflow.exceptions
import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd

os.environ.setdefault("KERAS_BACKEND", "jax")  # when served without fp8exp, which sets it too

FORMAT = 1
"""Layout version of the saved model; a model of another format is refused with both versions."""
ARTIFACT_PATH = "model"
KERAS_FILE = "model.keras"
META_FILE = "fp8exp_model.json"
VOCABULARY_FILE = "vocabulary.txt"
PAD = 0
INFERENCE_BATCH = 256


class ModelFileError(Exception):
    """The saved model cannot be used; the message says which file and why."""


class InputError(ValueError):
    """Input the model cannot take (empty, not token ids for a synthetic run)."""


# ---------------------------------------------------------------- loading


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: this is not a model saved by fp8exp") from None
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{path} is unreadable or corrupt ({error})") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise ModelFileError(f"{path} is not fp8exp model metadata")
    if meta["format"] != FORMAT:
        raise ModelFileError(
            f"the model was saved by fp8exp {meta.get('fp8exp_version', '?')} in model format {meta['format']}; "
            f"this fp8exp reads format {FORMAT}: use the fp8exp version that trained it, or train again")
    return meta


def load_keras(path: Path, meta: dict):
    """Rebuild from the file's config, re-apply the saved quantized policies, load every variable."""
    import keras
    import keras_hub  # noqa: F401  (registers TokenAndPositionEmbedding, TransformerDecoder)

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json").decode("utf-8")
        model = keras.models.model_from_json(config)
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
    try:
        model.load_weights(path)
    except Exception as error:  # h5py and Keras raise many kinds for a damaged weights file
        raise ModelFileError(f"{path}: its weights cannot be loaded ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return model


def check_texts(texts: list) -> None:
    """Refuse no texts, and name the rows (from 0) that are null, not strings or empty: the model
    would otherwise answer them with a confident label."""
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
    """A saved fp8exp model and its tokenizer: strings in, labels and probabilities out. The
    model runs with training=False (`predict_on_batch`), so FP8 scales stay as trained."""

    def __init__(self, model, meta: dict, vocabulary: list[str] | None):
        self.model = model
        self.meta = meta
        self.vocabulary = vocabulary
        self._tokenizer = None

    @classmethod
    def load(cls, directory: str | Path) -> "TextClassifier":
        """From an MLflow model directory (`model/`) or its `artifacts/` folder."""
        directory = Path(directory)
        if (directory / "artifacts").is_dir():
            directory = directory / "artifacts"
        return cls.from_files(directory / KERAS_FILE, directory / META_FILE, directory / VOCABULARY_FILE)

    @classmethod
    def from_files(cls, keras_path, meta_path, vocabulary_path=None) -> "TextClassifier":
        meta = read_meta(Path(meta_path))
        vocabulary = None
        if meta["input"] == "text":
            if vocabulary_path is None or not Path(vocabulary_path).is_file():
                raise ModelFileError(f"{vocabulary_path or VOCABULARY_FILE} is missing: a text model needs its vocabulary")
            # One token per "\n"-ended line; not splitlines(): U+2028 and U+2029 can be inside tokens.
            vocabulary = Path(vocabulary_path).read_text(encoding="utf-8").removesuffix("\n").split("\n")
            if len(vocabulary) != meta["vocabulary_size"]:
                raise ModelFileError(f"{vocabulary_path} has {len(vocabulary)} tokens, the model "
                                     f"{meta['vocabulary_size']}: the files do not belong together")
        return cls(load_keras(Path(keras_path), meta), meta, vocabulary)

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def sequence_length(self) -> int:
        return self.meta["sequence_length"]

    @property
    def takes_token_ids(self) -> bool:
        return self.meta["input"] == "token_ids"

    def encode(self, texts: list[str]) -> Encoded:
        """Token ids padded or truncated to the sequence length, as training prepared them."""
        check_texts(texts)
        if self.takes_token_ids:
            return self._parse_ids(texts)
        if self.meta["lowercase"]:
            texts = [text.lower() for text in texts]
        if self._tokenizer is None:
            import keras_hub

            # One id beyond the sequence length tells a truncated input from one that fits.
            self._tokenizer = keras_hub.tokenizers.WordPieceTokenizer(
                vocabulary=self.vocabulary, sequence_length=self.sequence_length + 1, lowercase=False,
                oov_token="[UNK]")
        ids = np.asarray(self._tokenizer(texts), dtype=np.int32)
        return Encoded(ids[:, :self.sequence_length], int(np.sum(ids[:, -1] != PAD)))

    def _parse_ids(self, texts: list[str]) -> Encoded:
        ids = np.full((len(texts), self.sequence_length), PAD, np.int32)
        truncated = 0
        limit = self.meta["vocabulary_size"]
        for row, text in enumerate(texts):
            try:
                tokens = [int(token) for token in text.split()]
            except ValueError:
                raise InputError(f"this model was trained on synthetic data and has no tokenizer: give token ids "
                                 f"separated by spaces (e.g. '5 17 33'), not {text[:40]!r}") from None
            if any(not 0 <= token < limit for token in tokens):
                raise InputError(f"token ids must be in [0, {limit}); got {text[:40]!r}")
            truncated += len(tokens) > self.sequence_length
            tokens = tokens[:self.sequence_length]
            ids[row, :len(tokens)] = tokens
        return Encoded(ids, truncated)

    def probabilities(self, ids: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """(inputs, classes) probabilities; the sigmoid head's one unit becomes [1 - p, p]."""
        outputs = [np.asarray(self.model.predict_on_batch(ids[start:start + batch_size]), np.float32)
                   for start in range(0, len(ids), batch_size)]
        out = np.concatenate(outputs)
        return np.concatenate([1 - out, out], axis=1) if out.shape[1] == 1 else out

    def classify(self, texts: list[str]) -> Predictions:
        encoded = self.encode(texts)
        probabilities = self.probabilities(encoded.ids)
        best = probabilities.argmax(axis=1)
        return Predictions([self.class_names[i] for i in best], probabilities[np.arange(len(best)), best],
                           probabilities, encoded.truncated)


# ---------------------------------------------------------------- MLflow pyfunc


def input_texts(model_input) -> list:
    """The texts of any accepted input, one per row or item (see the module docstring); MLflow hands
    the input over as given, the signature declaring no input schema."""
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


class PyfuncTextClassifier(mlflow.pyfunc.PythonModel):
    """`mlflow models predict/serve`: strings in, a DataFrame of label and probability out."""

    def load_context(self, context):
        artifacts = context.artifacts
        self.classifier = TextClassifier.from_files(artifacts["keras_model"], artifacts["meta"],
                                                    artifacts.get("vocabulary"))

    # Any shape input_texts takes: MLflow neither validates a DataFrame hint nor, given one, warns to add hints.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        try:
            result = self.classifier.classify(input_texts(model_input))
        except InputError as error:  # a 400 that says what is wrong with the request
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(error)) from None
        return pd.DataFrame({"label": result.labels, "probability": result.probability.astype(np.float64)})


mlflow.models.set_model(PyfuncTextClassifier())
