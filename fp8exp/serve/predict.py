"""`python -m fp8exp.predict run_id=RUN_ID text="..."`: classify texts with the model a run saved.

    python -m fp8exp.predict run_id=0c5e... text="a wonderful film"
    python -m fp8exp.predict model_id=m-4f1a... text="a wonderful film"  # a LoggedModel (Models tab)
    python -m fp8exp.predict run_id=0c5e... file=reviews.txt          # one text per line
    cat reviews.txt | python -m fp8exp.predict run_id=0c5e...         # stdin (or file=-)
    python -m fp8exp.predict run_id=0c5e... file=a.txt file=- format=jsonl

Prints one line per input: label, probability of that label and the text (tab-separated), or
JSON lines with every class's probability (format=jsonl). The model runs in inference mode
(training=False): FP8 scales stay as trained, nothing is calibrated. Inputs longer than the
model's sequence length are truncated, and a note says how many. A run on synthetic data has
no tokenizer: give token ids separated by spaces ("5 17 33").

Settings (key=value):
  run_id        the MLflow run whose model to use (printed at the end of every run): its LoggedModel
                `model`, or its artifact `model/` (runs saved offline, or before fp8exp logged models)
  model_id      or the model itself: a LoggedModel's id (`models:/<model_id>`, the Models tab)
  text          a text to classify (repeatable)
  file          a file with one text per line, `-` for stdin (repeatable); blank lines are skipped
  tracking.uri  the MLflow store, the runner's key (default: sqlite:///<current dir>/mlflow.db, as
                fp8exp uses; `tracking_uri` is accepted too)
  format        tsv (default) | jsonl
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROG = "fp8exp.predict"
KEYS = ("run_id", "model_id", "text", "file", "tracking.uri", "format")
# Other spellings of a key: the one these commands used before they took the runner's.
ALIASES = {"tracking_uri": "tracking.uri"}
REPEATABLE = ("text", "file")
FORMATS = ("tsv", "jsonl")
ECHO_CHARS = 60


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit 2."""


@dataclass
class Args:
    run_id: str = ""
    model_id: str = ""
    texts: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    format: str = "tsv"


def parse_settings(argv: list[str], keys=KEYS, repeatable=REPEATABLE) -> dict[str, list[str]]:
    """`key=value` words -> {key: [values]}; unknown keys and missing `=` are errors."""
    settings: dict[str, list[str]] = {}
    for word in argv:
        key, sep, value = word.partition("=")
        key = key.strip().lstrip("-")
        key = ALIASES.get(key, key)
        if not sep:
            raise UsageError(f"expected key=value, got {word!r}; valid keys: {', '.join(keys)}")
        if key not in keys:
            raise UsageError(f"unknown setting {key!r}; valid keys: {', '.join(keys)}")
        if key in settings and key not in repeatable:
            raise UsageError(f"{key} given twice")
        settings.setdefault(key, []).append(value)
    return settings


def read_lines(name: str, stdin) -> list[str]:
    """One text per "\n"-ended line, a trailing "\r" dropped, from a file and stdin alike: not
    splitlines(), which also breaks at U+2028, U+0085 and form feeds, nor sys.stdin's universal
    newlines, which break at a lone "\r": its bytes are decoded instead, as UTF-8 like a file's."""
    if name == "-":
        buffer = getattr(stdin, "buffer", None)
        text = buffer.read().decode("utf-8", errors="replace") if buffer else stdin.read()
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"file: {name} does not exist" if not path.exists() else f"file: {name} is not a file")
        text = path.read_bytes().decode("utf-8", errors="replace")
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_args(argv: list[str], stdin=None) -> Args:
    """Everything checkable without Keras or MLflow, including reading the input."""
    stdin = sys.stdin if stdin is None else stdin
    settings = parse_settings(argv)
    args = Args()
    run_id = settings.get("run_id", [""])[0].strip()
    model_id = settings.get("model_id", [""])[0].strip()
    if run_id and model_id:
        raise UsageError("give run_id=... or model_id=..., not both")
    if not run_id and not model_id:
        raise UsageError("run_id is required: the MLflow run whose model to use (fp8exp prints it after each run), "
                         "or model_id=: its LoggedModel's id")
    args.run_id, args.model_id = run_id, model_id
    args.tracking_uri = settings.get("tracking.uri", [None])[0] or None
    args.format = settings.get("format", ["tsv"])[0]
    if args.format not in FORMATS:
        raise UsageError(f"format: got {args.format!r}; valid: {', '.join(FORMATS)}")

    for text in settings.get("text", []):
        if not text.strip():
            raise UsageError("text is empty; give the text to classify, e.g. text=\"a wonderful film\"")
        args.texts.append(text)
    files = settings.get("file", [])
    if not settings.get("text") and not files:
        if stdin is None or stdin.isatty():
            raise UsageError('nothing to classify: give text="...", file=PATH (one text per line), or pipe texts on stdin')
        files = ["-"]
    for name in files:
        lines = [line for line in read_lines(name, stdin) if line.strip()]
        if not lines:
            raise UsageError(f"{'stdin' if name == '-' else 'file: ' + name} has no text to classify (empty)")
        args.texts.extend(lines)
    return args


# ---------------------------------------------------------------- the run's model


def store_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UsageError(f"no MLflow store at {uri}; run from the directory you trained in, or pass tracking.uri=")
    return uri


@dataclass
class Located:
    directory: Path
    """The MLflow model directory on this machine."""
    name: str
    """The model, for messages."""
    run_id: str | None
    model_id: str | None
    """The LoggedModel's id; None for a run's plain artifact `model/`."""


def locate(run_id: str | None, tracking_uri: str | None, scratch: Path, model_id: str | None = None) -> Located:
    """The saved model of run `run_id` or the LoggedModel `model_id`, on this machine (downloaded
    into `scratch` unless the artifact store is local). A run's model is its newest READY LoggedModel
    named `model`, else its plain artifact `model/`. Needs MLflow only."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = store_uri(tracking_uri)
    client = MlflowClient(uri)
    if model_id:
        try:
            model = client.get_logged_model(model_id)
        except MlflowException:
            raise UsageError(f"no model {model_id!r} in the store at {uri}") from None
        name = f"model {model_id} ({model.name}, {model.status}, of run {model.source_run_id})"
        if str(model.status) == "FAILED":
            raise UsageError(f"{name} failed while it was saved; use its run's model or train again")
        return Located(_logged_model_files(client, model, scratch, name), name, model.source_run_id, model_id)

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"no run {run_id!r} in the store at {uri}") from None
    name = f"run {run_id} ({run.info.run_name}, {run.info.status})"
    model = run_model(client, run)
    if model is not None:
        return Located(_logged_model_files(client, model, scratch, name), f"{name}, model {model.model_id}",
                       run_id, model.model_id)
    return Located(_artifact_files(client, run, scratch, name), name, run_id, None)


def run_model(client, run):
    """The run's newest READY LoggedModel named `model`, or None (a plain artifact, no model)."""
    from fp8exp.serve import pyfunc as serving

    models = client.search_logged_models(  # (a filter on status finds nothing in MLflow 3.17's SQL store)
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{serving.ARTIFACT_PATH}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    return next((model for model in models if str(model.status) == "READY"), None)


def _logged_model_files(client, model, scratch: Path, name: str) -> Path:
    import mlflow.artifacts

    from fp8exp.tracking.store import local_path

    files = {artifact.path for artifact in client.list_logged_model_artifacts(model.model_id)}
    if "artifacts" not in files or "MLmodel" not in files:
        raise UsageError(f"{name} has no files (status {model.status}): its upload did not complete; "
                         "use its run's model (run_id=) or train again")
    local = local_path(model.artifact_location)
    if local is not None and local.is_dir():
        return local
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(scratch),
                                                   tracking_uri=client.tracking_uri))


def _artifact_files(client, run, scratch: Path, name: str) -> Path:
    """A run's plain artifact `model/` (runs saved offline or by fp8exp before LoggedModels)."""
    import mlflow.artifacts

    from fp8exp.serve import pyfunc as serving
    from fp8exp.tracking.store import local_path

    where = f"{run.info.artifact_uri.rstrip('/')}/{serving.ARTIFACT_PATH}"
    try:
        saved = {artifact.path for artifact in mlflow.artifacts.list_artifacts(artifact_uri=where,
                                                                              tracking_uri=client.tracking_uri)}
    except Exception:  # noqa: BLE001  (stores differ in what they raise for a missing folder)
        saved = set()
    if "artifacts" not in {path.rstrip("/").rsplit("/", 1)[-1] for path in saved}:
        why = "it ended before saving" if run.info.status != "FINISHED" else \
            "it ran with tracking.save_model=false or before fp8exp saved models"
        raise UsageError(f"{name} has no saved model ({why}); train again with tracking.save_model=true")
    local = local_path(run.info.artifact_uri)
    if local is not None and (local / serving.ARTIFACT_PATH).is_dir():
        return local / serving.ARTIFACT_PATH
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(scratch),
                                                   tracking_uri=client.tracking_uri))


def model_dir(run_id: str | None, tracking_uri: str | None, scratch: Path,
              model_id: str | None = None) -> tuple[Path, str]:
    """(the model directory, a description for messages): see locate."""
    located = locate(run_id, tracking_uri, scratch, model_id)
    return located.directory, located.name


def check_files(directory: Path, name: str) -> dict:
    """Metadata and the model file's outline, before Keras loads (and TensorFlow starts)."""
    import zipfile

    from fp8exp.serve import pyfunc as serving

    files = directory / "artifacts"
    try:
        meta = serving.read_meta(files / serving.META_FILE)
    except serving.ModelFileError as error:
        raise UsageError(f"{name}: {error}".replace(str(directory), "model")) from None
    keras_file = files / serving.KERAS_FILE
    try:
        with zipfile.ZipFile(keras_file) as archive:
            members = set(archive.namelist())
            damaged = archive.testzip()
    except FileNotFoundError:
        raise UsageError(f"{name}: model/artifacts/{serving.KERAS_FILE} is missing") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise UsageError(f"{name}: model/artifacts/{serving.KERAS_FILE} is corrupt ({error})") from None
    if damaged or not {"config.json", "model.weights.h5"} <= members:
        raise UsageError(f"{name}: model/artifacts/{serving.KERAS_FILE} is corrupt "
                         f"({'bad CRC in ' + damaged if damaged else 'not a Keras model file'})")
    return meta


def load(run_id: str | None, tracking_uri: str | None, scratch: Path, model_id: str | None = None):
    """(TextClassifier, model description); UsageError for anything a user can fix."""
    directory, name = model_dir(run_id, tracking_uri, scratch, model_id)
    check_files(directory, name)
    import fp8exp  # noqa: F401  (the Keras backend)
    from fp8exp.serve import pyfunc as serving

    try:
        return serving.TextClassifier.load(directory), name
    except serving.ModelFileError as error:
        raise UsageError(f"{name}: {error}".replace(str(directory), "model")) from None


# ---------------------------------------------------------------- output


def one_line(text: str, limit: int = ECHO_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write(predictions, texts: list[str], class_names: list[str], fmt: str, out) -> None:
    for index, text in enumerate(texts):
        label, probability = predictions.labels[index], float(predictions.probability[index])
        if fmt == "jsonl":
            every = {name: round(float(p), 6) for name, p in zip(class_names, predictions.probabilities[index])}
            out.write(json.dumps({"text": text, "label": label, "probability": round(probability, 6),
                                  "probabilities": every}) + "\n")
        else:
            out.write(f"{label}\t{probability:.4f}\t{one_line(text)}\n")


def main(argv: list[str] | None = None, stdin=None, out=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = out or sys.stdout
    if any(word in ("-h", "--help", "help") for word in argv):
        print(__doc__.strip())
        return 0
    try:
        args = parse_args(argv, stdin)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fp8exp-predict-") as scratch:
            classifier, name = load(args.run_id or None, args.tracking_uri, Path(scratch), args.model_id or None)
            from fp8exp.serve.pyfunc import InputError

            try:
                predictions = classifier.classify(args.texts)
            except InputError as error:
                raise UsageError(str(error)) from None
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    write(predictions, args.texts, classifier.class_names, args.format, out)
    if predictions.truncated:
        print(f"{PROG}: note: {predictions.truncated} of {len(args.texts)} inputs were longer than the model's "
              f"{classifier.sequence_length} tokens and were truncated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
