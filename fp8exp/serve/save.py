"""Save a trained model: the `.keras` file without optimizer state, its tokenizer files and metadata, as
an MLflow pyfunc model whose code is serve/pyfunc.py with serve/textmodel/, models/pooling.py and
precision/recipes/ beside it, logged as the run's MLflow LoggedModel named `model` (see log_model), or
as the run's plain artifact `model/` when the store cannot take one. Classifiers (the reference one and
the keras-hub families') and language models (task=causal_lm) alike, in any precision and FP8 recipe;
textmodel/__init__.py lists the files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fp8exp.models import pooling
from fp8exp.precision import recipes
from fp8exp.serve import logged, pyfunc, textmodel
from fp8exp.serve.meta import describe_run
from fp8exp.serve.textmodel import ARTIFACT_PATH, KERAS_FILE, META_FILE, TOKENIZER_FILES
from fp8exp.tracking.offline import MODEL_ID_TAG

log = logging.getLogger(__name__)


def save_keras(net, path: Path) -> None:
    """The model without optimizer state (a third of the size with Adam), over the same layers, so
    the same variables, paths and config: a classifier as an uncompiled functional model; a keras-hub
    CausalLM as a new one of its class on the same backbone (generation needs the class)."""
    import keras
    import keras_hub

    # Built with no distribution: a multi-process one would make the copy's new variables (a
    # compiled CausalLM's optimizer) a collective that only the saving process enters.
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        if isinstance(net, keras_hub.models.CausalLM):
            type(net)(backbone=net.backbone, preprocessor=None).save(path)
            return
        inputs = net.input if isinstance(net.input, dict) else net.inputs  # a family's {"token_ids", "padding_mask"}
        keras.Model(inputs, net.outputs, name=net.name).save(path)
    finally:
        keras.distribution.set_distribution(previous)


def pip_requirements() -> list[str]:
    """What serving imports, pinned to this environment's versions (skips MLflow's inference,
    which loads the model in a subprocess); `tokenizers` runs keras-hub's BPE."""
    from importlib import metadata

    names = ["mlflow", "keras", "keras-hub", "jax", "jaxlib", "ml-dtypes", "numpy", "pandas", "tensorflow-text",
             "tensorflow", "tokenizers"]
    return [f"{name}=={metadata.version(name)}" for name in names]


def signature(meta: dict | None = None):
    """Outputs and, for a language model, the generation params. No input schema: any makes MLflow
    refuse some accepted shape before pyfunc.py sees it: a column `text` refuses lists, strings and
    arrays; an unnamed column, {"inputs": {"text": [...]}} over HTTP; and a dict {"text": [a, b]}
    becomes one row holding the list. textmodel.input_texts checks the input instead."""
    from dataclasses import fields

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if meta is None or meta["task"] == "classify":
        return ModelSignature(outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))
    kinds = {"max_new_tokens": "long", "sampler": "string", "top_k": "long", "seed": "long"}
    params = ParamSchema([ParamSpec(field.name, kinds[field.name], field.default)
                          for field in fields(textmodel.Settings)])
    return ModelSignature(outputs=Schema([ColSpec("string", "generated")]), params=params)


def save_mlflow_model(directory: Path, net, meta: dict, vocabulary: list[str] | None, mlflow_model=None, *,
                      merges: list[str] | None = None) -> Path:
    """Write the MLflow model directory `directory` (must not exist); returns it. `mlflow_model`: an
    `mlflow.models.Model` carrying a LoggedModel's ids into MLmodel. `merges`: a BPE tokenizer's."""
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
            for name, lines in (("vocabulary", vocabulary), ("merges", merges)):
                if lines is not None:  # one per "\n"-ended line
                    (staging / TOKENIZER_FILES["bpe"][name]).write_text("".join(f"{line}\n" for line in lines),
                                                                         encoding="utf-8")
                    artifacts[name] = str(staging / TOKENIZER_FILES["bpe"][name])
            # The serving code MLflow puts on sys.path for pyfunc.py: the package, the pooling layer a
            # family classifier's config names, and the FP8 recipe layers (code/recipes/).
            code_paths = [str(Path(textmodel.__file__).parent), pooling.__file__, str(Path(recipes.__file__).parent)]
            mlflow.pyfunc.save_model(str(directory), python_model=pyfunc.__file__, artifacts=artifacts,
                                     code_paths=code_paths, signature=signature(meta),
                                     pip_requirements=pip_requirements(), mlflow_model=mlflow_model)
        finally:
            quiet.setLevel(level)
            if progress is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = progress
    return directory


def log_model(run, net, splits, cfg, staging: Path) -> str | None:
    """`tracking.save_model`: the trained model as the run's MLflow LoggedModel `model` (the
    experiment's Models tab, the runs table's Models column, `models:/<model_id>`,
    `runs:/<run_id>/model`), tagged with its precision and metadata, with the run's test metrics
    (logged.MODEL_METRICS), and registered as a version of `tracking.register_model` if set. Returns its id.

    A local artifact store gets the files written in place; for a tracking server they are written
    into `staging` (which must outlive the run) and every call after the LoggedModel's creation goes
    through the run's queue, so a server that goes away delays them, no more. Where no LoggedModel
    can be created (the run is in the offline store, whose sync delivers run artifacts; or the server
    is away right now) the model is the run's plain artifact `model/` instead, as before, and a
    warning says so: predict, infer_bench and `runs:/<run_id>/model` use it all the same. Files bound
    for a server are in the run's journal either way, so a run that ends up in the offline store
    keeps its model (as the plain artifact)."""
    from fp8exp import __version__

    if run.run_id is None:
        return None
    meta = describe_run(net, splits, cfg, __version__, run.run_id)
    register = cfg.tracking.get("register_model") or None
    run.flush()  # the final metrics first: the LoggedModel's are the same values
    model, why = logged.create_logged_model(run, cfg, meta)
    if model is None:
        log_artifact_model(run, net, splits, meta, staging)
        note = ""
        if register and why.startswith("the run is in the offline store"):
            note = (f"; not registered as {register!r} either: once synced, register it with "
                    f"mlflow.register_model('runs:/<run id on the server>/{ARTIFACT_PATH}', {register!r})")
        elif register:
            note = f"; it is registered as {register!r} once the store takes the run's queued calls"
            _queue(run, f"register:{ARTIFACT_PATH}", lambda: logged.register_version(
                run.client, register, f"{run.artifact_uri}/{ARTIFACT_PATH}", run.run_id, meta["precision"]))
        log.warning("Run %s: the model is saved as the run's plain artifact %s/, not as a LoggedModel (%s); "
                    "fp8exp.predict run_id=%s, fp8exp.infer_bench and runs:/%s/%s use it, the Models tab does not "
                    "show it%s", run.run_id, ARTIFACT_PATH, why, run.run_id, run.run_id, ARTIFACT_PATH, note)
        return None

    import shutil

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from fp8exp.tracking.store import local_path

    client, model_id = run.client, model.model_id
    mlflow_model = Model(artifact_path=model.artifact_location, run_id=run.run_id, model_uuid=model_id,
                         model_id=model_id)
    local = local_path(model.artifact_location)
    try:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
            directory = save_mlflow_model(local, net, meta, splits.vocabulary, mlflow_model, merges=splits.merges)
        else:
            directory = save_mlflow_model(Path(staging) / f"{ARTIFACT_PATH}-{model_id}", net, meta,
                                          splits.vocabulary, mlflow_model, merges=splits.merges)
    except BaseException:
        _quietly(lambda: client.finalize_logged_model(model_id, LoggedModelStatus.FAILED))
        raise
    # Lost for good, the server's part of the run goes to the offline store from the journal: the
    # model with it, as the plain artifact model/ (the LoggedModel stays PENDING on the server).
    run.keep_for_offline(directory, ARTIFACT_PATH)
    # Which LoggedModel to close at sync if the run ends up offline before it is READY.
    run.set_tags({MODEL_ID_TAG: model_id})
    uploaded = [local is not None]

    def upload():
        client.log_model_artifacts(model_id, str(directory))
        uploaded[0] = True

    def finalize():
        if uploaded[0]:
            client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            return
        # The store rejected the upload (a client error, not an outage): keep the files as before.
        log.warning("Run %s: the upload of LoggedModel %s was rejected; the model goes to the run's artifact "
                    "%s/ instead", run.run_id, model_id, ARTIFACT_PATH)
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        client.log_artifacts(run.run_id, str(directory), ARTIFACT_PATH)

    if local is None:
        _queue(run, f"model:{model_id}:files", upload)
    metrics, step = logged.model_metrics(run.journal.metrics, model_id)
    _queue(run, f"model:{model_id}:output", lambda: client.log_outputs(run.run_id, [LoggedModelOutput(model_id, step)]))
    if metrics:
        _queue(run, f"model:{model_id}:metrics", lambda: client.log_batch(run.run_id, metrics=metrics))
    _queue(run, f"model:{model_id}:ready", finalize)
    if register:
        def register_uploaded():  # a rejected upload left the files in the run's model/, not in the LoggedModel
            if uploaded[0]:
                logged.register_version(client, register, model.artifact_location, run.run_id, meta["precision"], model_id)
            else:
                logged.register_version(client, register, f"{run.artifact_uri}/{ARTIFACT_PATH}", run.run_id,
                                 meta["precision"])

        _queue(run, f"model:{model_id}:register", register_uploaded)
    log.info("Run %s: model saved as LoggedModel %s (models:/%s)", run.run_id, model_id, model_id)
    return model_id


def log_artifact_model(run, net, splits, meta: dict, staging: Path) -> None:
    """The model as the run's plain artifact `model/` (fp8exp's layout before LoggedModels)."""
    import shutil

    local = run.local_artifact_dir()
    if local is not None:
        target = Path(local) / ARTIFACT_PATH
        shutil.rmtree(target, ignore_errors=True)  # a resumed run saves again
        save_mlflow_model(target, net, meta, splits.vocabulary, merges=splits.merges)
    else:
        directory = Path(staging) / ARTIFACT_PATH
        shutil.rmtree(directory, ignore_errors=True)
        run.log_artifacts(save_mlflow_model(directory, net, meta, splits.vocabulary, merges=splits.merges),
                          ARTIFACT_PATH)


def _queue(run, key: str, call) -> None:
    """Through the run's queue; a call the store rejects is logged, not raised: training is done."""
    try:
        run.call(key, call)
    except Exception as error:  # noqa: BLE001
        log.error("MLflow rejected a call for run %s's model (%s): %s", run.run_id, key, error)


def _quietly(call) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001
        pass
