"""The MLflow "model from code" of every saved fp8exp model: `mlflow.pyfunc.load_model(...).predict`
and `mlflow models serve` run it. save.py hands this file to MLflow, which keeps a copy in the model
directory, with this package's serving code beside it (code/textmodel/, code/pooling.py and
code/recipes/, the FP8 recipe layers; on sys.path when MLflow loads the model).

It imports only the standard library, pandas and MLflow, and, once MLflow loads the model, the
shipped textmodel package, pooling module and recipes package: never the rest of fp8exp, so the
logged model serves without fp8exp installed (`mlflow models serve -m models:/MODEL_ID --env-manager local`).
In a process where fp8exp registered its recipe layers already, the model uses those; fp8exp's checks
recognise the shipped copy's layers too, by their registered names (recipes/layers.py is_recipe_layer).

Inputs are strings (a synthetic run's are token ids separated by spaces, "5 17 33"): a DataFrame
with a column `text` (or one unnamed column), a Series, a list or NumPy array of strings, one
string, and a dict {"text": [...]} or {"text": "one"}; over HTTP, `dataframe_split`,
`dataframe_records`, `inputs` and `instances`. The signature declares no input schema: MLflow's
enforcement would refuse some of these or turn {"text": [a, b]} into one text (save.py says which).
A null (None, NaN) or empty text is refused, naming every such row (from 0): "row 1: text is null,
row 2: text is empty; ...", a 400 when served.

- A classifier (task=classify) answers a DataFrame of `label` and `probability` per text; longer
  inputs are truncated to the model's sequence length.
- A language model (task=causal_lm) answers a DataFrame with the continuation of each text,
  `generated`. MLflow params (declared in the signature, so `mlflow models serve` takes
  {"params": {...}} beside the input): `max_new_tokens` (32, or fewer to fit the trained window), `sampler` (greedy | top_k),
  `top_k` (5) and `seed` (none: random); a bad value is a 400 naming it. Greedy gives what
  `python -m fp8exp.predict` prints for the same model and text.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports Keras: fp8exp trains on JAX

import mlflow.exceptions
import mlflow.models
import mlflow.pyfunc
import pandas as pd


class PyfuncTextModel(mlflow.pyfunc.PythonModel):
    """`mlflow models predict/serve`: strings in, a DataFrame of labels or continuations out."""

    def load_context(self, context):
        # From the model's code/ folder, which MLflow puts on sys.path before it loads this file.
        import keras
        import pooling  # noqa: F401  (registers fp8exp>SequencePooling, the families' classifier pooling)
        import textmodel

        if keras.saving.get_registered_object("fp8exp>RecipeDense") is None:  # else fp8exp's own, in this process
            import recipes.layers  # noqa: F401  (registers fp8exp>RecipeDense and fp8exp>RecipeEinsumDense)

        self.textmodel = textmodel
        self.model = textmodel.from_artifacts(context.artifacts)

    # Any shape input_texts takes: MLflow neither validates a DataFrame hint nor, given one, warns to add hints.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        textmodel = self.textmodel
        try:
            texts = textmodel.input_texts(model_input)
            if isinstance(self.model, textmodel.TextGenerator):
                names = [field.name for field in dataclasses.fields(textmodel.Settings)]
                given = {key: value for key, value in (params or {}).items() if key in names}
                result = self.model.generate(texts, self.model.settings(**given))
                return pd.DataFrame({"generated": result.texts})
            result = self.model.classify(texts)
        except textmodel.InputError as error:  # a 400 that says what is wrong with the request
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(error)) from None
        return pd.DataFrame({"label": result.labels, "probability": result.probability.astype("float64")})


mlflow.models.set_model(PyfuncTextModel())
