"""`python -m fp8exp.infer_bench`: what a trained model costs at inference, and whether FP8 really
saves the post-training quantization INT8 needs.

    python -m fp8exp.infer_bench                              # every run of the latest sweep
    python -m fp8exp.infer_bench parent=SWEEP_RUN_ID          # every run of one sweep
    python -m fp8exp.infer_bench run_id=BF16_RUN run_id=FP8_RUN

For each run with a saved model (tracking.save_model, on by default):
- latency (median milliseconds per `predict_on_batch` call, output back on the host) and throughput
  at batch sizes 1, 32 and 256, for the model as trained, in inference mode;
- test accuracy of the model as trained; and for a run not trained in FP8 (the BF16 baseline)
  also after INT8 post-training quantization (Keras `quantize("int8")`: per-channel weights,
  activations scaled per token at run time), after `quantize("float8")` as Keras leaves it (every
  scale 1.0), and after `quantize("float8")` with scales calibrated on training examples.

The metrics land on each run (`infer/latency_ms_b<N>`, `infer/examples_per_s_b<N>`,
`infer/<variant>/accuracy`, tag `infer.device`), the table in `inference.md`: in out=DIR (default:
beside the sweep's report) and logged under `report/` on a sweep's parent run, or under `infer/` on
each named run. `python -m fp8exp.report` shows the same table once a sweep has it.

Settings (key=value):
  run_id               a run to benchmark (repeatable)
  parent               a sweep's parent run: all its finished runs (default: the latest sweep)
  tracking_uri         the MLflow store (default: sqlite:///<current dir>/mlflow.db)
  out                  where inference.md goes
  batch_sizes          default 1,32,256
  seconds              timing budget per batch size (default 1.0; at least 3 calls each)
  calibration_examples training examples the calibrated FP8 variant measures scales on (default 256)
  max_test             evaluate on at most this many test examples (default: all)
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fp8exp.predict import UsageError, parse_settings, store_uri

PROG = "fp8exp.infer_bench"
KEYS = ("run_id", "parent", "tracking_uri", "out", "batch_sizes", "seconds", "calibration_examples", "max_test")
BASELINE = "mixed_bfloat16"
FP8 = "float8"
AS_TRAINED = "as_trained"
# Variants of a model not trained in FP8, in table order; an FP8-trained model is only `as_trained`.
PTQ_VARIANTS = ("int8_ptq", "fp8_ptq", "fp8_ptq_calibrated")
VARIANT_LABELS = {
    AS_TRAINED: "as trained",
    "int8_ptq": "INT8 post-training quantization",
    "fp8_ptq": "FP8 post-training, scales 1.0 (uncalibrated)",
    "fp8_ptq_calibrated": "FP8 post-training, calibrated scales",
}
FP8_MAX = {"inputs": 448.0, "kernel": 448.0}  # E4M3; output gradients play no part in inference


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


def _number(key: str, text: str, kind=int, minimum=1):
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{key}: got {text!r}, expected a number") from None
    if not value >= minimum or (kind is float and not math.isfinite(value)):
        raise UsageError(f"{key}: got {text}, expected at least {minimum}")
    return value


def parse_args(argv: list[str]) -> Settings:
    settings = parse_settings(argv, KEYS, repeatable=("run_id",))
    single = {key: values[0] for key, values in settings.items()}
    run_ids = [run_id.strip() for run_id in settings.get("run_id", []) if run_id.strip()]
    if run_ids and single.get("parent"):
        raise UsageError("give run_id=... or parent=..., not both")
    if "run_id" in settings and not run_ids:
        raise UsageError("run_id is empty")
    sizes = [_number("batch_sizes", part) for part in single.get("batch_sizes", "1,32,256").split(",") if part.strip()]
    if not sizes:
        raise UsageError("batch_sizes: give at least one, e.g. batch_sizes=1,32,256")
    return Settings(run_ids, single.get("parent") or None, single.get("tracking_uri") or None,
                    Path(single["out"]) if single.get("out") else None, sizes,
                    _number("seconds", single.get("seconds", "1.0"), float, 0.0),
                    _number("calibration_examples", single.get("calibration_examples", "256")),
                    _number("max_test", single["max_test"]) if "max_test" in single else None)


# ---------------------------------------------------------------- measuring


def time_batches(model, x: np.ndarray, batch_sizes: list[int], seconds: float) -> dict[str, float]:
    """Median wall time of `predict_on_batch` per batch size (after one call that compiles); the
    call returns NumPy, so each interval includes finishing on the device and the copy back."""
    metrics = {}
    for size in batch_sizes:
        batch = np.resize(x, (size, x.shape[1]))  # test examples, repeated if there are fewer
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


def calibrate_fp8(model, x: np.ndarray, batch_size: int = 128, passes: int = 2) -> None:
    """Per-tensor FP8 scales from data, in inference mode: each quantized layer's input amax over
    `x` (as fp8_health.Probe captures it) and its kernel's amax, each over E4M3's max. A second
    pass measures inputs again once the layers upstream quantize with their calibrated scales."""
    import keras

    from fp8exp.fp8 import scale_variables
    from fp8exp.fp8_health import Probe

    entries = [entry for entry in scale_variables(model) if entry.tensor in FP8_MAX]
    layers = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
    batches = [x[start:start + batch_size] for start in range(0, len(x) - batch_size + 1, batch_size)] or [x]
    probe = Probe(model, batches[0])
    for _ in range(passes):
        input_amax: dict[str, float] = {}
        for batch in batches:
            probe.batch = batch
            for path, capture in probe.run().items():
                input_amax[path] = max(input_amax.get(path, 0.0), float(np.max(np.abs(capture.inputs))))
        for entry in entries:
            if entry.tensor == "inputs":
                amax = input_amax[entry.layer]
            else:
                amax = float(np.max(np.abs(keras.ops.convert_to_numpy(layers[entry.layer].kernel))))
            if not math.isfinite(amax):
                raise ValueError(f"calibrating {entry.layer}: its {entry.tensor} are not finite")
            if amax > 0:
                entry.scale.assign(np.float32(amax / FP8_MAX[entry.tensor]))
                history = np.zeros(entry.amax_history.shape, np.float32)
                history[0] = amax
                entry.amax_history.assign(history)


def variant(directory: Path, name: str, calibration_x: np.ndarray | None = None):
    """A fresh copy of the saved model as `name` evaluates it (see VARIANT_LABELS)."""
    import warnings

    from fp8exp import serving

    if name not in VARIANT_LABELS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANT_LABELS)}")
    classifier = serving.TextClassifier.load(directory)
    if name != AS_TRAINED:
        with warnings.catch_warnings():  # one "cannot be quantized" per norm, dropout, embedding...
            warnings.simplefilter("ignore")
            classifier.model.quantize("int8" if name == "int8_ptq" else "float8")
    if name == "fp8_ptq_calibrated":
        calibrate_fp8(classifier.model, calibration_x)
    return classifier


# ---------------------------------------------------------------- runs


@dataclass
class Target:
    run_id: str
    name: str
    precision: str
    directory: Path


def resolve_runs(client, settings: Settings):
    """(runs to benchmark, sweep parent id or None): named runs, a sweep's children, or the latest sweep's."""
    from mlflow.exceptions import MlflowException

    from fp8exp import report

    if settings.run_ids:
        runs = []
        for run_id in settings.run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise UsageError(f"no run {run_id!r} in the store") from None
        return runs, None
    try:
        source = report.find_source(client, settings.parent, None)
    except report.ReportError as error:
        if settings.parent:
            raise UsageError(str(error).replace("--parent", "parent")) from None
        raise UsageError("no sweep in the store: name runs with run_id=... (repeatable) or a sweep with parent=...") from None
    runs = [client.get_run(run.run_id) for run in source.runs if run.status == "FINISHED"]
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


def bench_run(client, run, settings: Settings, scratch: Path) -> dict[str, float]:
    """Measure one run and log the results to it; returns the metrics."""
    import jax

    from fp8exp import predict

    directory, name = predict.model_dir(run.info.run_id, settings.tracking_uri, scratch)
    predict.check_files(directory, name)
    precision = run.data.params.get("precision.name", "?")
    print(f"{PROG}: {run.info.run_name} ({precision}) ...", file=sys.stderr, flush=True)
    as_trained = variant(directory, AS_TRAINED)
    splits = test_data(client, run, as_trained, scratch)
    x_test, y_test = splits.x_test[:settings.max_test], splits.y_test[:settings.max_test]

    metrics = {"infer/test_examples": float(len(y_test))}
    metrics[f"infer/{AS_TRAINED}/accuracy"] = accuracy(as_trained, x_test, y_test)
    metrics.update(time_batches(as_trained.model, x_test, settings.batch_sizes, settings.seconds))
    if precision != FP8:
        calibration = splits.x_train[:settings.calibration_examples]
        for name_ in PTQ_VARIANTS:
            metrics[f"infer/{name_}/accuracy"] = accuracy(variant(directory, name_, calibration), x_test, y_test)
    device = jax.devices()[0]
    client.log_batch(run.info.run_id, metrics=_metrics(metrics),
                     tags=[_tag("infer.device", f"{device.platform}:{device.device_kind}")])
    return metrics


def _metrics(values: dict[str, float]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0) for key, value in values.items()]


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


# ---------------------------------------------------------------- the table


def has_inference(rows) -> bool:
    return any(f"infer/{AS_TRAINED}/accuracy" in run.metrics for row in rows for run in row.runs)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def inference_table(rows) -> str:
    """Markdown: one line per configuration (report.Row) and way of evaluating it; accuracy is the
    mean over the configuration's runs (seeds), Δ against the baseline as trained at the same
    setting (else this configuration as trained), timings the median over runs."""
    sizes = sorted({int(key.rsplit("_b", 1)[1]) for row in rows for run in row.runs for key in run.metrics
                    if key.startswith("infer/latency_ms_b")})
    header = ["configuration", "evaluated as", "runs", "test accuracy", f"Δ vs {BASELINE} as trained"]
    header += [f"ms/batch b={size}" for size in sizes]
    if sizes:
        header.append(f"examples/s b={sizes[-1]}")
    baselines = {row.setting: row for row in rows if row.precision == BASELINE}
    lines = []
    for row in rows:
        if not any(f"infer/{AS_TRAINED}/accuracy" in run.metrics for run in row.runs):
            continue
        base = baselines.get(row.setting, row)
        base_accuracy = _mean([run.metrics[f"infer/{AS_TRAINED}/accuracy"] for run in base.runs
                               if f"infer/{AS_TRAINED}/accuracy" in run.metrics])
        for name in (AS_TRAINED, *PTQ_VARIANTS):
            values = [run.metrics[f"infer/{name}/accuracy"] for run in row.runs if f"infer/{name}/accuracy" in run.metrics]
            if not values:
                continue
            mean = _mean(values)
            delta = "–" if row is base and name == AS_TRAINED else f"{(mean - base_accuracy) * 100:+.2f} pts"
            cells = [row.label, VARIANT_LABELS[name], str(len(values)), f"{mean:.4f}", delta]
            for size in sizes:
                latency = row.median(f"infer/latency_ms_b{size}") if name == AS_TRAINED else None
                cells.append(f"{latency:.2f}" if latency else "")
            if sizes:
                rate = row.median(f"infer/examples_per_s_b{sizes[-1]}") if name == AS_TRAINED else None
                cells.append(f"{rate:,.0f}" if rate else "")
            lines.append(cells)
    table = [header] + lines
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


NOTE = ("Inference mode throughout (training=False: FP8 scales stay as trained). Δ is against the "
        f"{BASELINE} model as trained at the same setting (where the set has none: this configuration's own). "
        "INT8 is Keras' "
        "`quantize(\"int8\")` of the trained model: per-channel weight scales, activation scales computed per "
        "token at run time. FP8 post-training is `quantize(\"float8\")` of the same model, first with the scales "
        "Keras starts from (1.0), then with per-tensor scales calibrated on training examples. Timings are for the "
        "model as trained: median milliseconds per `predict_on_batch` call; on a CPU FP8 is emulated, so judge "
        "speed on a GPU with FP8 tensor cores.")


def markdown(rows, title: str) -> str:
    return f"# Inference: {title}\n\n{inference_table(rows)}\n\n> {NOTE}\n"


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
    import fp8exp  # noqa: F401  (the Keras backend)
    from mlflow.tracking import MlflowClient

    from fp8exp import report

    client = MlflowClient(uri)
    runs, source = resolve_runs(client, settings)
    benched, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="fp8exp-infer-") as scratch:
        for index, run_ in enumerate(runs):
            own = Path(scratch) / str(index)
            own.mkdir()
            try:
                bench_run(client, run_, settings, own)
                benched.append(run_.info.run_id)
            except UsageError as error:
                if settings.run_ids:  # a named run that cannot be measured is an error
                    raise
                skipped.append(f"{run_.info.run_name}: {error}")
    if not benched:
        raise UsageError("no run with a saved model to benchmark:\n  " + "\n  ".join(skipped))

    measured = [report._run_data(client.get_run(run_id)) for run_id in benched]
    rows = report.build_rows(measured)
    title = source.title if source else ", ".join(run.name for run in measured)
    text = markdown(rows, title)
    if settings.out:
        out = settings.out
    elif source:
        out = report.default_out_dir(source)
    else:
        out = Path("multirun") / "reports" / report.slug(f"inference {title}")
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
