"""A run's data as MLflow dataset inputs: what fills the Dataset column and filter of the MLflow UI.

One dataset per split, logged with the input tag `mlflow.data.context` = `train`, `validation` or
`test`, named `<source>:<split>` (`imdb:train`, `clothing_reviews.parquet:test`, `synthetic:validation`)
and with fp8exp's data fingerprint as its digest, the same for all three: runs on the same prepared
data share the same datasets (`dataset.digest = '<fingerprint>'` finds them), other settings give
another digest. (MLflow keeps one input per dataset and run, so the three splits need three names.)
The profile holds the split's size and examples per class; the schema the token-id and label tensors.
"""

from __future__ import annotations

import json

from fp8exp.tracking import redact

CONTEXT_TAG = "mlflow.data.context"


def _source(source: str | None) -> tuple[str, str]:
    """MLflow's (source_type, source) for a download URL, a local path, or generated data."""
    if source and "://" in source:  # any URL (ftp:// too) can carry credentials
        return ("http" if source.startswith(("http://", "https://")) else "url"), json.dumps({"url": redact.text(source)})
    if source:
        return "local", json.dumps({"uri": redact.text(source)})
    return "code", json.dumps({"tags": {"generator": "fp8exp.data.synthetic"}})


def _schema(sequence_length: int, token_dtype: str, label_dtype: str) -> str:
    """What mlflow.data.from_numpy would record: a tensor spec of the features and targets."""
    def spec(name, dtype, shape):
        return json.dumps([{"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}, "name": name}])

    return json.dumps({"mlflow_tensorspec": {"features": spec("token_ids", token_dtype, [-1, sequence_length]),
                                             "targets": spec("label", label_dtype, [-1])}})


def dataset_inputs(name: str, digest: str, source: str | None, splits: dict[str, dict], sequence_length: int,
                   token_dtype: str = "int32", label_dtype: str = "int32") -> list:
    """`splits`: context -> {"num_rows": n, "class_counts": {class name: n}}. Returns DatasetInputs
    for MlflowClient.log_inputs."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type, source_json = _source(source)
    schema = _schema(sequence_length, token_dtype, label_dtype)
    inputs = []
    for context, split in splits.items():
        profile = {"num_rows": split["num_rows"], "num_classes": len(split["class_counts"]),
                   "class_counts": split["class_counts"], "sequence_length": sequence_length}
        dataset = Dataset(name=redact.text(f"{name}:{context}"), digest=digest, source_type=source_type,
                          source=source_json, schema=schema, profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, context)]))
    return inputs
