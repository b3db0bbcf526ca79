"""`python -m fp8exp.report`: did FP8 cost accuracy, and was it faster? Reads the runs of a sweep
from MLflow and writes a table (Markdown and CSV) with one row per configuration, plots (PNG) and
a console summary; with a sweep, all of it is logged as artifacts on the sweep's parent run.

    python -m fp8exp.report                     # the latest sweep in the store
    python -m fp8exp.report --parent RUN_ID     # one sweep
    python -m fp8exp.report --experiment NAME   # every finished run of an experiment
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BASELINE = "mixed_bfloat16"
SEED_PARAMS = ("trainer.seed",)
PRECISION = "precision.name"
SIZE = "model.hidden_dim"
STEP_MS = "perf/step_time_ms"
SCALED_TENSORS = ("inputs", "kernel", "outputs_grad")


class ReportError(Exception):
    """Nothing to compare; the message says why and what would help."""


@dataclass
class RunData:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    device: str = ""

    @property
    def seed(self) -> str:
        return "/".join(self.params.get(key, "") for key in SEED_PARAMS)


@dataclass
class Source:
    """The runs to compare and where the report goes."""

    title: str
    runs: list[RunData]
    parent_run_id: str | None = None
    sweep_dir: str | None = None


# ---------------------------------------------------------------- statistics


@dataclass
class Delta:
    """Mean difference (configuration - baseline) with a t-based 95% confidence interval."""

    mean: float
    low: float | None
    high: float | None
    n: int
    paired: bool

    @property
    def verdict(self) -> str:
        if self.low is None:
            return "one seed: no CI"
        if self.high < 0:
            return "LOST accuracy"
        if self.low > 0:
            return "gained accuracy"
        return "no clear accuracy change"


def delta_ci(values: dict[str, float], baseline: dict[str, float], confidence: float = 0.95) -> Delta:
    """`values` and `baseline` map seed -> metric. Seeds present in both are paired (the same
    data order and initialisation, so seed-to-seed noise cancels); otherwise Welch's interval."""
    from scipy import stats

    common = sorted(set(values) & set(baseline))
    if len(common) >= 2:
        diffs = np.array([values[s] - baseline[s] for s in common])
        half = stats.t.ppf((1 + confidence) / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        return Delta(float(diffs.mean()), float(diffs.mean() - half), float(diffs.mean() + half), len(diffs), True)
    a, b = np.array(list(values.values())), np.array(list(baseline.values()))
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Delta(mean, None, None, min(len(a), len(b)), False)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return Delta(mean, mean, mean, min(len(a), len(b)), False)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf((1 + confidence) / 2, dof) * math.sqrt(va + vb)
    return Delta(mean, mean - half, mean + half, min(len(a), len(b)), False)


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    """One configuration: every run that differs only by seed."""

    precision: str
    setting: tuple[tuple[str, str], ...]
    """The other params that vary in the sweep (model.hidden_dim first), as (key, value)."""
    runs: list[RunData] = field(default_factory=list)
    delta: Delta | None = None
    speedup: float | None = None

    def metric(self, key: str) -> dict[str, float]:
        return {run.seed: run.metrics[key] for run in self.runs if key in run.metrics}

    def median(self, key: str) -> float | None:
        values = list(self.metric(key).values())
        return float(np.median(values)) if values else None

    @property
    def accuracy(self) -> np.ndarray:
        return np.array(list(self.metric("test/accuracy").values()))

    @property
    def size_label(self) -> str:
        return " ".join(f"h{v}" if k == SIZE else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.setting) or "all"

    @property
    def hidden_dim(self) -> int | None:
        value = dict(self.setting).get(SIZE) or self.runs[0].params.get(SIZE)
        return int(value) if value and value.isdigit() else None

    @property
    def label(self) -> str:
        return f"{self.precision} {self.size_label}"


def setting_params(runs: list[RunData]) -> list[str]:
    """The params that tell configurations apart: the size always, then precision and any other
    that splits the runs further. One that merely follows another (intermediate_dim tracking
    hidden_dim, float8's source policy tracking the precision) adds no group and is left out."""
    keys = sorted({key for run in runs for key in run.params} - set(SEED_PARAMS) - {SIZE},
                  key=lambda k: (k != PRECISION, k))
    kept = [SIZE] if any(SIZE in run.params for run in runs) else []
    groups = len({tuple(run.params.get(k) for k in kept) for run in runs})
    for key in keys:
        count = len({tuple(run.params.get(k) for k in (*kept, key)) for run in runs})
        if count > groups:
            kept, groups = kept + [key], count
    return kept


def build_rows(runs: list[RunData]) -> list[Row]:
    """Group finished runs into configurations and compare each with the baseline precision at
    the same setting. Options under `precision.` belong to the precision (float8 with another
    amax history is another precision), so they never stop a match with the baseline."""
    keys = setting_params(runs)
    by_config: dict[tuple, Row] = {}
    for run in runs:
        options = [f"{k.split('.', 1)[1]}={run.params[k]}" for k in keys
                   if k.startswith("precision.") and k != PRECISION and run.params.get(k) != "null"]
        precision = run.params.get(PRECISION, "?") + (f" ({', '.join(options)})" if options else "")
        setting = tuple((k, run.params.get(k, "")) for k in keys if not k.startswith("precision."))
        by_config.setdefault((precision, setting), Row(precision, setting)).runs.append(run)

    rows = sorted(by_config.values(), key=lambda r: (r.hidden_dim or 0, r.setting, r.precision != BASELINE, r.precision))
    baselines = {row.setting: row for row in rows if row.precision == BASELINE}
    for row in rows:
        base = baselines.get(row.setting)
        if base is None or row is base:
            continue
        row.delta = delta_ci(row.metric("test/accuracy"), base.metric("test/accuracy"))
        mine, theirs = row.median(STEP_MS), base.median(STEP_MS)
        row.speedup = theirs / mine if mine and theirs else None
    return rows


# ---------------------------------------------------------------- tables


COLUMNS = ["precision", "size", "seeds", "test accuracy", f"Δ accuracy vs {BASELINE} [95% CI]", "verdict",
           "step ms (median)", "speedup", "examples/s", "params"]


def _pts(x: float) -> str:
    return f"{x * 100:+.2f}"


def speed_verdict(speedup: float | None) -> str:
    if speedup is None:
        return ""
    return f"{speedup:.2f}x " + ("faster" if speedup > 1 else "slower")


def verdict(row: Row) -> str:
    if row.precision == BASELINE:
        return "baseline"
    if row.delta is None:
        return "no baseline to compare"
    return f"{row.delta.verdict}; " + (speed_verdict(row.speedup) or "no step time")


def table_cells(row: Row) -> list[str]:
    acc = row.accuracy
    spread = f" ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else ""
    if row.delta is None:
        delta = "–"
    elif row.delta.low is None:
        delta = f"{_pts(row.delta.mean)} pts (n={row.delta.n}, no CI)"
    else:
        delta = (f"{_pts(row.delta.mean)} pts [{_pts(row.delta.low)}, {_pts(row.delta.high)}]"
                 f"{'' if row.delta.paired else ' unpaired'}")
    step, rate, params = row.median(STEP_MS), row.median("perf/examples_per_s"), row.median("model/params")
    return [row.precision, row.size_label, str(len(row.runs)), f"{acc.mean():.4f}{spread}" if len(acc) else "–",
            delta, verdict(row), f"{step:.2f}" if step else "–",
            f"{row.speedup:.2f}x" if row.speedup else ("1.00x" if row.precision == BASELINE and step else "–"),
            f"{rate:,.0f}" if rate else "–", f"{params:,.0f}" if params else "–"]


def markdown_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        setting_keys = [k for k, _ in rows[0].setting]
        out.writerow(["precision", *setting_keys, "seeds", "test_accuracy_mean", "test_accuracy_sd",
                      "delta_accuracy", "delta_ci_low", "delta_ci_high", "delta_paired",
                      "step_time_ms_median", "speedup", "examples_per_s_median", "params", "run_ids"])
        for row in rows:
            acc, d = row.accuracy, row.delta
            out.writerow([row.precision, *[v for _, v in row.setting], len(row.runs),
                          acc.mean() if len(acc) else "", acc.std(ddof=1) if len(acc) > 1 else "",
                          d.mean if d else "", d.low if d and d.low is not None else "",
                          d.high if d and d.high is not None else "", d.paired if d else "",
                          row.median(STEP_MS) or "", row.speedup or "", row.median("perf/examples_per_s") or "",
                          row.median("model/params") or "", " ".join(r.run_id for r in row.runs)])


def headline(rows: list[Row]) -> list[str]:
    """The answer in one line per compared configuration."""
    lines = []
    for row in rows:
        if row.delta is None:
            continue
        d = row.delta
        interval = f" [95% CI {_pts(d.low)}, {_pts(d.high)}] -> {d.verdict}" if d.low is not None else f" ({d.verdict})"
        lines.append(f"{row.label}: accuracy {_pts(d.mean)} pts vs {BASELINE}{interval}; "
                     f"{speed_verdict(row.speedup) or 'no step time'}")
    return lines


# ---------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 4.2, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)


def _precisions(rows: list[Row]) -> list[str]:
    return sorted({row.precision for row in rows}, key=lambda p: (p != BASELINE, p))


def plot_accuracy(rows: list[Row], path: Path) -> None:
    fig, [[ax]] = _figure()
    sizes = list(dict.fromkeys(row.size_label for row in rows))
    precisions = _precisions(rows)
    width = 0.8 / len(precisions)
    for i, precision in enumerate(precisions):
        for row in (r for r in rows if r.precision == precision):
            x = sizes.index(row.size_label) + (i - (len(precisions) - 1) / 2) * width
            acc = row.accuracy
            ax.errorbar([x], [acc.mean()], yerr=[acc.std(ddof=1) if len(acc) > 1 else 0], fmt="o", capsize=4,
                        color=f"C{i}", label=precision if row is next(r for r in rows if r.precision == precision) else None)
            ax.scatter([x] * len(acc), acc, s=12, color=f"C{i}", alpha=0.4)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy by precision and size (mean ± sd; dots are seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def crossover(rows: list[Row], precision: str = "float8") -> str:
    """Where `precision` first beats the baseline's step time, in size order."""
    faster = [row.size_label for row in rows if row.precision == precision and row.speedup]
    wins = [row.size_label for row in rows if row.precision == precision and (row.speedup or 0) > 1]
    if not faster:
        return ""
    if not wins:
        return f"{precision} is never faster than {BASELINE} here"
    return f"{precision} is faster than {BASELINE} at {', '.join(wins)}"


def plot_step_time(rows: list[Row], path: Path, note: str) -> None:
    fig, [[ax]] = _figure()
    sizes = list(dict.fromkeys(row.size_label for row in rows))
    numeric = all(row.hidden_dim for row in rows) and len({row.hidden_dim for row in rows}) == len(sizes)
    for i, precision in enumerate(_precisions(rows)):
        mine = [row for row in rows if row.precision == precision and row.median(STEP_MS)]
        xs = [row.hidden_dim if numeric else sizes.index(row.size_label) for row in mine]
        ax.plot(xs, [row.median(STEP_MS) for row in mine], "o-", color=f"C{i}", label=precision)
    if numeric:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({row.hidden_dim for row in rows}), [str(h) for h in sorted({row.hidden_dim for row in rows})])
        ax.set_xlabel("model.hidden_dim")
    else:
        ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("median step time (ms, lower is faster)")
    ax.set_title("Step time by size" + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_fp8_scales(client, run: RunData, path: Path) -> bool:
    """Every quantized layer's scale over training, one panel per scaled tensor; False when the
    run logged no FP8 state (any precision but float8)."""
    keys = sorted(k for k in run.metrics if k.startswith("fp8/") and k.endswith("_scale"))
    if not keys:
        return False
    fig, axes = _figure(width=4.6, height=3.8, ncols=len(SCALED_TENSORS))
    for ax, tensor in zip(axes[0], SCALED_TENSORS):
        for key in (k for k in keys if k.endswith(f"/{tensor}_scale")):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key))
            ax.plot([s for s, _ in history], [v for _, v in history], ".-", label=key[4:-len(f"/{tensor}_scale")])
        ax.set_yscale("log")
        ax.set_title(f"{tensor}_scale")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("scale (amax / fp8 max)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"FP8 scales per layer: {run.name}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=100)
    return True


# ---------------------------------------------------------------- reading MLflow


def _run_data(run) -> RunData:
    return RunData(run.info.run_id, run.info.run_name, run.info.status, dict(run.data.params),
                   dict(run.data.metrics), run.data.tags.get("device", ""))


def find_source(client, parent: str | None, experiment: str | None) -> Source:
    from mlflow.exceptions import MlflowException

    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ReportError(f"no experiment named {experiment!r} in the store")
        runs = client.search_runs([found.experiment_id], "tags.`sweep.jobs` IS NULL", max_results=5000)
        return Source(f"experiment {experiment}", [_run_data(r) for r in runs])
    if parent is None:
        experiments = [e.experiment_id for e in client.search_experiments()]
        latest = client.search_runs(experiments, "tags.`sweep.jobs` LIKE '%'", max_results=1,
                                    order_by=["attributes.start_time DESC"]) if experiments else []
        if not latest:
            raise ReportError("no sweep in the store; run one (python -m fp8exp -m precision=mixed_bfloat16,float8 ...) "
                              "or name runs with --experiment")
        parent = latest[0].info.run_id
    try:
        sweep = client.get_run(parent)
    except MlflowException:
        raise ReportError(f"--parent: no run {parent!r} in the store") from None
    children = client.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=5000)
    return Source(f"sweep {sweep.info.run_name}", [_run_data(r) for r in children], parent,
                  sweep.data.tags.get("sweep.dir"))


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def default_out_dir(source: Source) -> Path:
    """Beside the sweep's jobs when that folder is here; else under multirun/reports/."""
    if source.sweep_dir and Path(source.sweep_dir).is_dir():
        return Path(source.sweep_dir) / "report"
    return Path("multirun") / "reports" / slug(source.title)


# ---------------------------------------------------------------- the report


def write_report(client, source: Source, out: Path) -> tuple[str, list[Path]]:
    """Write every file; returns the Markdown and the paths written."""
    finished = [run for run in source.runs if run.status == "FINISHED" and "test/accuracy" in run.metrics]
    left_out = [run for run in source.runs if run not in finished]
    statuses = ", ".join(f"{sum(r.status == s for r in left_out)} {s}" for s in sorted({r.status for r in left_out}))
    if not finished:
        raise ReportError(f"{source.title} has no finished runs ({len(source.runs)} in all"
                          f"{': ' + statuses if statuses else ''}); nothing to compare")
    rows = build_rows(finished)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if not any(row.precision == BASELINE for row in rows):
        notes.append(f"No {BASELINE} runs: accuracy deltas and speedups need the baseline; "
                     f"add precision={BASELINE} to the sweep.")
    if left_out:
        notes.append(f"Left out {len(left_out)} run(s) that did not finish ({statuses}): "
                     + ", ".join(run.name for run in left_out) + ".")
    devices = sorted({run.device for run in finished if run.device})
    if any(device.startswith("cpu") for device in devices):
        notes.append("Step times were measured on a CPU, where FP8 is emulated (quantize-dequantize around a "
                     "bfloat16 matmul): judge accuracy here, speed on a GPU with FP8 tensor cores.")

    files = [out / "report.md", out / "report.csv", out / "accuracy.png", out / "step_time.png"]
    write_csv(rows, out / "report.csv")
    plot_accuracy(rows, out / "accuracy.png")
    note = crossover(rows)
    plot_step_time(rows, out / "step_time.png", note)
    scale_plots = []
    for row in rows:
        path = out / f"fp8_scales_{slug(row.label)}.png"
        if plot_fp8_scales(client, min(row.runs, key=lambda r: r.seed), path):
            scale_plots.append(path)
    files += scale_plots

    lines = [f"# FP8 report: {source.title}", ""]
    lines += [f"- {line}" for line in headline(rows)] or ["- nothing to compare against a baseline"]
    if note:
        lines.append(f"- {note}")
    lines += ["", markdown_table(rows), ""]
    lines += [f"> {n}" for n in notes]
    lines += ["", "Accuracy is the test split's, mean ± sd over seeds; Δ is in percentage points, paired by seed "
              "where both precisions ran the same seeds (t-based 95% interval). Step time is the median over seeds "
              "of each run's median step; speedup = baseline step time / this step time.", ""]
    from fp8exp import infer_bench

    if infer_bench.has_inference(rows):  # python -m fp8exp.infer_bench ran on this sweep
        lines += ["## Inference", "", infer_bench.inference_table(rows), "", f"> {infer_bench.NOTE}", ""]
    lines += ["![accuracy](accuracy.png)", "", "![step time](step_time.png)", ""]
    lines += [f"![{p.stem}]({p.name})" for p in scale_plots]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return markdown, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8exp.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent", metavar="RUN_ID", help="the sweep's parent run (default: the latest sweep)")
    which.add_argument("--experiment", metavar="NAME", help="every run of this experiment instead of one sweep")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///<current dir>/mlflow.db, as fp8exp)")
    parser.add_argument("--out", type=Path, help="output folder (default: <sweep dir>/report)")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from fp8exp.config import tracking_uri

    uri = tracking_uri(OmegaConf.create({"tracking": {"uri": args.tracking_uri}}))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"fp8exp.report: error: no MLflow store at {uri}; run a sweep here first or pass --tracking-uri",
              file=sys.stderr)
        return 1
    client = MlflowClient(uri)
    try:
        source = find_source(client, args.parent, args.experiment)
        out = args.out or default_out_dir(source)
        markdown, files = write_report(client, source, out)
    except ReportError as error:
        print(f"fp8exp.report: error: {error}", file=sys.stderr)
        return 1
    if source.parent_run_id:
        client.log_artifacts(source.parent_run_id, str(out), artifact_path="report")
    print(markdown.split("\n![", 1)[0].rstrip())
    print(f"\nWrote {', '.join(p.name for p in files)} to {out}"
          + (f"; logged under 'report/' on parent run {source.parent_run_id}" if source.parent_run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
