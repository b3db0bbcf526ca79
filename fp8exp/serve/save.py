"""Save a trained model as the run's artifact `model/`: the `.keras` file without optimizer state,
its vocabulary and metadata, as an MLflow pyfunc model whose code is serve/pyfunc.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fp8exp.serve import pyfunc
from fp8exp.serve.pyfunc import (
    ARTIFACT_PATH,
    FORMAT,
    KERAS_FILE,
    META_FILE,
    VOCABULARY_FILE,
)


def quantized_layers(net) -> dict[str, dict]:
    """Layer path -> serialized dtype policy, for every layer whose policy quantizes."""
    import keras

    return {layer.path: keras.dtype_policies.serialize(layer.dtype_policy)
            for layer in net._flatten_layers(include_self=False)
            if getattr(layer.dtype_policy, "quantization_mode", None)}


def describe(net, *, precision: str, class_names: list[str], sequence_length: int, lowercase: bool,
             vocabulary_size: int, has_vocabulary: bool, fp8exp_version: str, run_id: str | None = None) -> dict:
    """The metadata `fp8exp_model.json` holds."""
    from importlib import metadata

    return {
        "format": FORMAT,
        "fp8exp_version": fp8exp_version,
        "keras_version": metadata.version("keras"),
        "keras_hub_version": metadata.version("keras-hub"),
        "run_id": run_id,
        "precision": precision,
        "class_names": list(class_names),
        "sequence_length": int(sequence_length),
        "lowercase": bool(lowercase),
        "vocabulary_size": int(vocabulary_size),
        "input": "text" if has_vocabulary else "token_ids",
        "quantized_layers": quantized_layers(net),
    }


def save_keras(net, path: Path) -> None:
    """The model without optimizer state (a third of the size with Adam): an uncompiled functional
    model over the same layers, so the same variables, paths and config."""
    import keras

    keras.Model(net.inputs, net.outputs, name=net.name).save(path)


def pip_requirements() -> list[str]:
    """What serving imports, pinned to this environment's versions (skips MLflow's inference,
    which loads the model in a subprocess)."""
    from importlib import metadata

    names = ["mlflow", "keras", "keras-hub", "jax", "jaxlib", "numpy", "pandas", "tensorflow-text", "tensorflow"]
    return [f"{name}=={metadata.version(name)}" for name in names]


def signature():
    """Outputs only. Any input schema makes MLflow refuse some accepted shape before pyfunc.py sees
    it: a column `text` refuses lists, strings and arrays; an unnamed column, {"inputs": {"text": [...]}}
    over HTTP; and a dict {"text": [a, b]} becomes one row holding the list. pyfunc.input_texts
    checks the input instead."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))


def save_mlflow_model(directory: Path, net, meta: dict, vocabulary: list[str] | None) -> Path:
    """Write the MLflow model directory `directory` (must not exist); returns it."""
    import logging
    import tempfile
    import warnings

    import mlflow.pyfunc

    quiet = logging.getLogger("mlflow")
    level, progress = quiet.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    with tempfile.TemporaryDirectory() as staging, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "add an input example", "add type hints": the signature is explicit
        quiet.setLevel(logging.ERROR)
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # MLflow "downloads" what it copies
        try:
            staging = Path(staging)
            save_keras(net, staging / KERAS_FILE)
            (staging / META_FILE).write_text(json.dumps(meta, indent=1))
            artifacts = {"keras_model": str(staging / KERAS_FILE), "meta": str(staging / META_FILE)}
            if vocabulary is not None:
                (staging / VOCABULARY_FILE).write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
                artifacts["vocabulary"] = str(staging / VOCABULARY_FILE)
            mlflow.pyfunc.save_model(str(directory), python_model=pyfunc.__file__, artifacts=artifacts,
                                     signature=signature(), pip_requirements=pip_requirements())
        finally:
            quiet.setLevel(level)
            if progress is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = progress
    return directory


def log_model(run, net, splits, cfg, staging: Path) -> None:
    """`tracking.save_model`: the trained model as the run's artifact `model/`. A local store gets it
    written in place; for a tracking server it is written into `staging` (which must outlive the
    run) and uploaded through the run's queue, so a server that is briefly away delays it, no more."""
    import shutil

    from fp8exp import __version__

    if run.run_id is None:
        return
    meta = describe(net, precision=cfg.precision.name, class_names=splits.class_names,
                    sequence_length=splits.sequence_length, lowercase=bool(cfg.data.get("lowercase", False)),
                    vocabulary_size=splits.vocabulary_size, has_vocabulary=splits.vocabulary is not None,
                    fp8exp_version=__version__, run_id=run.run_id)
    local = run.local_artifact_dir()
    if local is not None:
        target = Path(local) / ARTIFACT_PATH
        shutil.rmtree(target, ignore_errors=True)  # a resumed run saves again
        save_mlflow_model(target, net, meta, splits.vocabulary)
    else:
        run.log_artifacts(save_mlflow_model(Path(staging) / ARTIFACT_PATH, net, meta, splits.vocabulary),
                          ARTIFACT_PATH)
