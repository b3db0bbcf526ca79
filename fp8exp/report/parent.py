"""The report's answer on the sweep's parent run, in the forms the MLflow UI shows at a glance:

- summary metrics, one group per configuration (columns of the run table): for each row
  `summary/<label>/test_accuracy_mean`, `step_time_ms` and, against the baseline, `delta_pts`,
  `delta_ci_low`, `delta_ci_high` (percentage points) and `speedup`; only those the row has.
  `<label>` is the report's own label ("float8 h32") with every run of characters MLflow does not
  take in a metric key made one dash: `float8-h32`, `mixed_bfloat16-h32`; language models
  (causal_lm) also get `val_loss_mean` (of the final `val/loss`) and, against the baseline,
  `rel_loss_error_pct`, `rel_loss_error_ci_low_pct`, `rel_loss_error_ci_high_pct` (parity.py);
- the tag `fp8exp.verdict`: the headline in one line (the run table's tag column), for language
  models the loss parity verdict;
- the report's Markdown as the run's description (`mlflow.note.content`), its plots shown from
  the run's `report/` artifacts.

`python -m fp8exp.report` and the end of every sweep (fp8exp/run/sweep.py) both publish here.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from fp8exp.report import parity
from fp8exp.report.document import Report, write_report
from fp8exp.report.rows import Row
from fp8exp.report.runs import BASELINE, STEP_MS, default_out_dir, find_source
from fp8exp.report.tables import SPEED_NOISE, crossover

SUMMARY = "summary"
VERDICT_TAG = "fp8exp.verdict"
NOTE_TAG = "mlflow.note.content"
ARTIFACT_DIR = "report"
MAX_VERDICT_CHARS = 500
MAX_NOTE_CHARS = 8000
"""MLflow's cap on a tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)."""
METRIC_BATCH = 998  # MLflow takes at most 1000 entities per log_batch; the first carries 2 tags
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^()/\s]+\.png)\)$")


def metric_label(row: Row) -> str:
    """The row's label as one segment of a metric key: "float8 (amax_history_length=16) h32" ->
    "float8-amax_history_length-16-h32" (MLflow keys take letters, digits, _ . - / only, and a
    slash would nest the group), at most 200 characters (MLflow takes keys of 250)."""
    return re.sub(r"[^\w.-]+", "-", row.label).strip("-")[:200] or "all"


def summary_metrics(rows: list[Row]) -> dict[str, float]:
    """`summary/<label>/<name>` -> value for every row; a row gets only the values it has."""
    metrics = {}
    losses = parity.summary_values(rows, parity.loss_parity(rows))  # the threshold changes no number
    for row in rows:
        accuracy, delta = row.accuracy, row.delta
        values = {"test_accuracy_mean": accuracy.mean() if len(accuracy) else None,
                  "delta_pts": delta.mean * 100 if delta else None,
                  "delta_ci_low": delta.low * 100 if delta and delta.low is not None else None,
                  "delta_ci_high": delta.high * 100 if delta and delta.high is not None else None,
                  "speedup": row.speedup,
                  "step_time_ms": row.median(STEP_MS), **losses.get(row.label, {})}
        metrics.update({f"{SUMMARY}/{metric_label(row)}/{name}": float(value) for name, value in values.items()
                        if value is not None and math.isfinite(value)})
    return metrics


def verdict(rows: list[Row], speed_noise: float = SPEED_NOISE, parity_threshold: float = parity.PARITY_THRESHOLD) -> str:
    """The headline lines joined with " | " (parity.answer_lines: loss parity for language models),
    the crossover last; whole lines that do not fit in MAX_VERDICT_CHARS are counted instead
    ("+2 more in the run's description")."""
    lines = parity.answer_lines(rows, speed_noise, parity_threshold) or [_nothing_to_compare(rows)]
    tail = [where] if (where := crossover(rows, noise=speed_noise)) else []
    for keep in range(len(lines), 0, -1):
        more = [f"+{len(lines) - keep} more in the run's description"] if keep < len(lines) else []
        text = " | ".join(lines[:keep] + more + tail)
        if len(text) <= MAX_VERDICT_CHARS:
            return text
    return text[:MAX_VERDICT_CHARS - 1] + "…"


def _nothing_to_compare(rows: list[Row]) -> str:
    precisions = {row.precision for row in rows}
    if BASELINE not in precisions:
        return f"no {BASELINE} runs: nothing to compare against"
    if precisions == {BASELINE}:
        return f"only {BASELINE} runs: nothing to compare"
    return f"nothing to compare: no {BASELINE} run at the same setting"


def note(markdown: str, run_id: str, plots: set[str]) -> str:
    """The report's Markdown as the run's description. A plot in `plots` (files logged under
    report/) is shown from the run's artifacts through the UI server's own `get-artifact` route
    (relative, so it works under a --static-prefix too); other image lines are left out. Cut at
    a line to fit MLflow's tag limit, saying so."""
    lines = []
    for line in markdown.rstrip("\n").split("\n"):
        image = _IMAGE.match(line)
        if image and image.group(2) in plots:
            lines.append(f"![{image.group(1)}](get-artifact?path={ARTIFACT_DIR}/{image.group(2)}&run_uuid={run_id})")
        elif not image:
            lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    text = "\n".join(lines) + "\n"
    if len(text) <= MAX_NOTE_CHARS:
        return text
    cut = (f"\n*… cut to fit MLflow's {MAX_NOTE_CHARS}-character limit: the whole report is "
           f"`{ARTIFACT_DIR}/report.md`.*\n")
    return text[:MAX_NOTE_CHARS - len(cut)].rsplit("\n", 1)[0] + "\n" + cut


def publish(client, parent_run_id: str, rows: list[Row], markdown: str, out: Path | None = None,
            speed_noise: float = SPEED_NOISE, parity_threshold: float = parity.PARITY_THRESHOLD) -> str:
    """Put the report on the sweep's parent run: the files in `out` (when given) under report/,
    the summary metrics, the verdict tag and the description. Returns the verdict.

    A parent in the offline store (tagged `fp8exp.sync.status`) gets all of it, delivered with it
    by `python -m fp8exp.tracking_sync`, except the plots in its description: the server copy may
    get another run id, so they would point nowhere; they stay in its artifacts."""
    from mlflow.entities import Metric, RunTag

    plots: set[str] = set()
    if out is not None:
        client.log_artifacts(parent_run_id, str(out), artifact_path=ARTIFACT_DIR)
        if "fp8exp.sync.status" not in client.get_run(parent_run_id).data.tags:
            plots = {path.name for path in Path(out).glob("*.png")}
    answer = verdict(rows, speed_noise, parity_threshold)
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in summary_metrics(rows).items()]
    tags = [RunTag(VERDICT_TAG, answer), RunTag(NOTE_TAG, note(markdown, parent_run_id, plots))]
    client.log_batch(parent_run_id, metrics=metrics[:METRIC_BATCH], tags=tags)
    for start in range(METRIC_BATCH, len(metrics), METRIC_BATCH):
        client.log_batch(parent_run_id, metrics=metrics[start:start + METRIC_BATCH])
    return answer


def report_sweep(client, parent_run_id: str, speed_noise: float = SPEED_NOISE,
                 parity_threshold: float = parity.PARITY_THRESHOLD) -> tuple[Report, Path, str]:
    """The whole report of one sweep, as `python -m fp8exp.report --parent` makes it: written
    beside its jobs (see `default_out_dir`) and published on the parent. Returns the report, the
    folder and the verdict; raises ReportError when there is nothing to compare."""
    source = find_source(client, parent_run_id, None)
    out = default_out_dir(source)
    report = write_report(client, source, out, speed_noise, parity_threshold)
    return report, out, publish(client, parent_run_id, report.rows, report.markdown, out, speed_noise,
                                parity_threshold)
