"""The inference table (what `python -m fp8exp.infer_bench` measured on a sweep's runs), shown in
its own `inference.md` and in the sweep's report."""

from __future__ import annotations

import numpy as np

from fp8exp.report.runs import BASELINE

AS_TRAINED = "as_trained"
# Variants of a model not trained in FP8, in table order; an FP8-trained model is only `as_trained`.
PTQ_VARIANTS = ("int8_ptq", "fp8_ptq", "fp8_ptq_calibrated")
VARIANT_LABELS = {
    AS_TRAINED: "as trained",
    "int8_ptq": "INT8 post-training quantization",
    "fp8_ptq": "FP8 post-training, scales 1.0 (uncalibrated)",
    "fp8_ptq_calibrated": "FP8 post-training, calibrated scales",
}


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
