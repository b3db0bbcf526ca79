"""`python -m fp8exp.infer_bench`: what a trained model costs at inference, and whether FP8 really
saves the post-training quantization INT8 needs.

    python -m fp8exp.infer_bench                              # every run of the latest sweep
    python -m fp8exp.infer_bench parent=SWEEP_RUN_ID          # every run of one sweep
    python -m fp8exp.infer_bench run_id=BF16_RUN run_id=FP8_RUN
    python -m fp8exp.infer_bench model_id=m-4f1a...             # a LoggedModel (and its run)

For each run with a saved model (tracking.save_model, on by default):
- latency (median milliseconds per `predict_on_batch` call, output back on the host) and throughput
  at batch sizes 1, 32 and 256, for the model as trained, in inference mode;
- test accuracy of the model as trained; and for a run not trained in FP8 (the BF16 baseline)
  also after INT8 post-training quantization (Keras `quantize("int8")`: per-channel weights,
  activations scaled per token at run time), after `quantize("float8")` as Keras leaves it (every
  scale 1.0), and after `quantize("float8")` with scales calibrated on training examples.

The metrics land on each run (`infer/latency_ms_b<N>`, `infer/examples_per_s_b<N>`,
`infer/<variant>/accuracy`, tag `infer.device`; on the run's LoggedModel too, when its model is one), the
table in `inference.md`: in out=DIR (default:
beside the sweep's report) and logged under `report/` on a sweep's parent run, or under `infer/` on
each named run. `python -m fp8exp.report` shows the same table once a sweep has it.

Settings (key=value):
  run_id               a run to benchmark (repeatable): its LoggedModel `model`, or its artifact `model/`
  model_id             a LoggedModel to benchmark, on its run's test data (repeatable)
  parent               a sweep's parent run: all its finished runs (default: the latest sweep)
  tracking.uri         the MLflow store, as for the runner (default: sqlite:///<current dir>/mlflow.db)
  out                  where inference.md goes
  batch_sizes          default 1,32,256
  seconds              timing budget per batch size (default 1.0; at least 3 calls each)
  calibration_examples training examples the calibrated FP8 variant measures scales on (default 256)
  max_test             evaluate on at most this many test examples (default: all)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fp8exp.report.inference import AS_TRAINED, PTQ_VARIANTS, markdown
from fp8exp.serve.ptq import variant
from fp8exp.serve.settings import UsageError, number, parse_settings, store_uri

PROG = "fp8exp.infer_bench"
KEYS = ("run_id", "model_id", "parent", "tracking.uri", "out", "batch_sizes", "seconds", "calibration_examples",
        "max_test")
FP8 = "float8"


@dataclass
class Settings:
    run_ids: list[str]
    parent: str | None
    tracking_uri: str | None
    out: Path | None
    batch_sizes: list[int]
    seconds: float
    calibration_examples: int
    max_test: int | None
    model_ids: list[str] = dataclasses.field(default_factory=list)




def parse_args(argv: list[str]) -> Settings:
    settings = parse_settings(argv, KEYS, repeatable=("run_id", "model_id"))
    single = {key: values[0] for key, values in settings.items()}
    run_ids = [run_id.strip() for run_id in settings.get("run_id", []) if run_id.strip()]
    model_ids = [model_id.strip() for model_id in settings.get("model_id", []) if model_id.strip()]
    if (run_ids or model_ids) and single.get("parent"):
        raise UsageError(f"give {'run_id' if run_ids else 'model_id'}=... or parent=..., not both")
    for key in ("run_id", "model_id"):
        if key in settings and not (run_ids if key == "run_id" else model_ids):
            raise UsageError(f"{key} is empty")
    sizes = [number("batch_sizes", part) for part in single.get("batch_sizes", "1,32,256").split(",") if part.strip()]
    if not sizes:
        raise UsageError("batch_sizes: give at least one, e.g. batch_sizes=1,32,256")
    return Settings(run_ids, single.get("parent") or None, single.get("tracking.uri") or None,
                    Path(single["out"]) if single.get("out") else None, sizes,
                    number("seconds", single.get("seconds", "1.0"), float, 0.0),
                    number("calibration_examples", single.get("calibration_examples", "256")),
                    number("max_test", single["max_test"]) if "max_test" in single else None, model_ids)


# ---------------------------------------------------------------- measuring


def time_batches(classifier, x: np.ndarray, batch_sizes: list[int], seconds: float) -> dict[str, float]:
    """Median wall time of `predict_on_batch` per batch size (after one call that compiles); the
    call returns NumPy, so each interval includes finishing on the device and the copy back."""
    metrics, model = {}, classifier.model
    for size in batch_sizes:
        batch = classifier.model_inputs(np.resize(x, (size, x.shape[1])))  # test examples, repeated if fewer
        model.predict_on_batch(batch)
        times, deadline = [], time.perf_counter() + seconds
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 10000):
            started = time.perf_counter()
            model.predict_on_batch(batch)
            times.append(time.perf_counter() - started)
        median = float(np.median(times))
        metrics[f"infer/latency_ms_b{size}"] = median * 1e3
        metrics[f"infer/examples_per_s_b{size}"] = size / median
    return metrics


def accuracy(classifier, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(classifier.probabilities(x).argmax(axis=1) == y))


# ---------------------------------------------------------------- runs


def resolve_runs(client, settings: Settings):
    """([(run, LoggedModel id or None: the run's own model)] to benchmark, the sweep or None): named
    runs and models, a sweep's children, or the latest sweep's."""
    from mlflow.exceptions import MlflowException

    from fp8exp.report.runs import ReportError, find_source

    if settings.run_ids or settings.model_ids:
        runs = []
        for run_id in settings.run_ids:
            try:
                runs.append((client.get_run(run_id), None))
            except MlflowException:
                raise UsageError(f"no run {run_id!r} in the store") from None
        for model_id in settings.model_ids:
            try:
                model = client.get_logged_model(model_id)
            except MlflowException:
                raise UsageError(f"no model {model_id!r} in the store") from None
            try:
                runs.append((client.get_run(model.source_run_id), model_id))
            except (MlflowException, TypeError):
                raise UsageError(f"model {model_id} has no run in the store (source run {model.source_run_id}): "
                                 "its test data is unknown") from None
        return runs, None
    try:
        source = find_source(client, settings.parent, None)
    except ReportError as error:
        if settings.parent:
            raise UsageError(str(error).replace("--parent", "parent")) from None
        raise UsageError("no sweep in the store: name runs with run_id=... (repeatable) or a sweep with parent=...") from None
    runs = [(client.get_run(run.run_id), None) for run in source.runs if run.status == "FINISHED"]
    if not runs:
        raise UsageError(f"{source.title} has no finished runs to benchmark")
    return runs, source


def test_data(client, run, classifier, scratch: Path):
    """The run's test split (and training split, for calibration), rebuilt from its config.yaml
    artifact: cached for real text, regenerated for synthetic data."""
    from omegaconf import OmegaConf

    from fp8exp import data
    from fp8exp.config import ConfigError

    path = client.download_artifacts(run.info.run_id, "config.yaml", str(scratch))
    cfg = OmegaConf.load(path)
    try:
        splits = data.load(cfg.data)
    except (ConfigError, OSError, ValueError) as error:
        raise UsageError(f"run {run.info.run_id}: its test data cannot be prepared again ({error})") from None
    if splits.sequence_length != classifier.sequence_length or (
            classifier.vocabulary is not None and splits.vocabulary != classifier.vocabulary):
        raise UsageError(f"run {run.info.run_id}: the data behind it changed since it trained "
                         "(another vocabulary or sequence length); its test accuracy cannot be measured again")
    return splits


def bench_run(client, run, settings: Settings, scratch: Path, model_id: str | None = None) -> dict[str, float]:
    """Measure one run's model (or its LoggedModel `model_id`) and log the results to the run, and to
    the LoggedModel when the model is one; returns the metrics."""
    import jax

    from fp8exp.serve import locate

    located = locate.locate(None if model_id else run.info.run_id, settings.tracking_uri, scratch, model_id)
    directory, name = located.directory, located.name
    meta = locate.check_files(directory, name)
    if meta["task"] != "classify":
        raise UsageError(f"{name} is a language model (task={meta['task']}): infer_bench measures classifiers only; "
                         "generate with python -m fp8exp.predict instead")
    precision = run.data.params.get("precision.name", "?")
    print(f"{PROG}: {run.info.run_name} ({precision}) ...", file=sys.stderr, flush=True)
    as_trained = variant(directory, AS_TRAINED)
    splits = test_data(client, run, as_trained, scratch)
    x_test, y_test = splits.x_test[:settings.max_test], splits.y_test[:settings.max_test]

    metrics = {"infer/test_examples": float(len(y_test))}
    metrics[f"infer/{AS_TRAINED}/accuracy"] = accuracy(as_trained, x_test, y_test)
    metrics.update(time_batches(as_trained, x_test, settings.batch_sizes, settings.seconds))
    if precision != FP8:
        calibration = splits.x_train[:settings.calibration_examples]
        for name_ in PTQ_VARIANTS:
            metrics[f"infer/{name_}/accuracy"] = accuracy(variant(directory, name_, calibration), x_test, y_test)
    device = jax.devices()[0]
    client.log_batch(run.info.run_id, metrics=_metrics(metrics, located.model_id),
                     tags=[_tag("infer.device", f"{device.platform}:{device.device_kind}")])
    return metrics


def _metrics(values: dict[str, float], model_id: str | None = None):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0, model_id=model_id) for key, value in values.items()]


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


# ---------------------------------------------------------------- the table


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(word in ("-h", "--help", "help") for word in argv):
        print(__doc__.strip())
        return 0
    try:
        settings = parse_args(argv)
        uri = store_uri(settings.tracking_uri)
        settings.tracking_uri = uri
        return run(settings, uri)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def run(settings: Settings, uri: str) -> int:
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    import fp8exp  # noqa: F401  (the Keras backend)
    from fp8exp.report.rows import build_rows
    from fp8exp.report.runs import default_out_dir, run_data, slug

    client = MlflowClient(uri)
    runs, source = resolve_runs(client, settings)
    benched, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="fp8exp-infer-") as scratch:
        for index, (run_, model_id) in enumerate(runs):
            own = Path(scratch) / str(index)
            own.mkdir()
            try:
                bench_run(client, run_, settings, own, model_id)
                if run_.info.run_id not in benched:
                    benched.append(run_.info.run_id)
            except UsageError as error:
                if settings.run_ids or settings.model_ids:  # a named run that cannot be measured is an error
                    raise
                skipped.append(f"{run_.info.run_name}: {error}")
    if not benched:
        raise UsageError("no run with a saved model to benchmark:\n  " + "\n  ".join(skipped))

    measured = [run_data(client.get_run(run_id)) for run_id in benched]
    rows = build_rows(measured)
    title = source.title if source else ", ".join(run.name for run in measured)
    text = markdown(rows, title)
    if settings.out:
        out = settings.out
    elif source:
        out = default_out_dir(source)
    else:
        out = Path("multirun") / "reports" / slug(f"inference {title}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.md").write_text(text)
    if source and source.parent_run_id:
        client.log_artifact(source.parent_run_id, str(out / "inference.md"), "report")
        where = f"logged under 'report/' on parent run {source.parent_run_id}"
    else:
        for run_id in benched:
            client.log_artifact(run_id, str(out / "inference.md"), "infer")
        where = "logged under 'infer/' on each run"
    print(text)
    for line in skipped:
        print(f"{PROG}: skipped {line}", file=sys.stderr)
    print(f"Wrote {out / 'inference.md'}; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
