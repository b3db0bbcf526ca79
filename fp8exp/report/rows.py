"""Configurations: runs grouped by everything but the seed, each compared with the baseline
precision at the same setting. A configuration counts each seed once: of reruns with the same
configuration and seed, the latest finished run (see `latest_per_seed`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fp8exp.report.runs import BASELINE, PRECISION, SEED_PARAMS, SIZE, STEP_MS, RunData
from fp8exp.report.stats import Delta, delta_ci


UNSET = (None, "", "null", "None")
"""A param absent (a run logged before the key existed) or logged as null."""


@dataclass
class Row:
    """One configuration: the runs that differ only by seed, one per seed."""

    precision: str
    setting: tuple[tuple[str, str], ...]
    """The other params that vary in the sweep (model.hidden_dim first), as (key, value)."""
    runs: list[RunData] = field(default_factory=list)
    superseded: list[RunData] = field(default_factory=list)
    diverged: list[RunData] = field(default_factory=list)
    """Runs of this configuration that failed with a non-finite loss or FP8 scale (attach_diverged)."""
    """Older runs of a seed in `runs`, left out of every number."""
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


def latest_per_seed(runs: list[RunData]) -> tuple[list[RunData], list[RunData]]:
    """(kept, superseded): for each seed the run that started last (a tie: ended last), since a
    rerun is made to replace the run before it; the others, superseded, in input order."""
    latest: dict[str, RunData] = {}
    for run in sorted(runs, key=lambda r: (r.start_time, r.end_time or 0)):
        latest[run.seed] = run
    return [r for r in runs if latest[r.seed] is r], [r for r in runs if latest[r.seed] is not r]


def build_rows(runs: list[RunData]) -> list[Row]:
    """Group finished runs into configurations and compare each with the baseline precision at
    the same setting. Options under `precision.` belong to the precision (float8 with another
    amax history is another precision), so they never stop a match with the baseline. Only the
    latest run of each configuration and seed counts; `Row.superseded` keeps the others."""
    keys = setting_params(runs)
    by_config: dict[tuple, Row] = {}
    for run in runs:
        options = [f"{k.split('.', 1)[1]}={run.params[k]}" for k in keys
                   if k.startswith("precision.") and k != PRECISION and run.params.get(k) not in UNSET]
        precision = run.params.get(PRECISION, "?") + (f" ({', '.join(options)})" if options else "")
        setting = tuple((k, run.params.get(k, "")) for k in keys if not k.startswith("precision."))
        by_config.setdefault((precision, setting), Row(precision, setting)).runs.append(run)
    for row in by_config.values():
        row.runs, row.superseded = latest_per_seed(row.runs)

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


def attach_diverged(rows: list[Row], runs: list[RunData]) -> None:
    """Give each configuration the runs with its precision and setting that failed non-finite: a
    diverged seed is evidence against FP8, not a run to leave out silently."""
    for run in runs:
        if run.status != "FAILED" or run.failure != "non_finite":
            continue
        for row in rows:
            ours = row.runs[0].params
            same_precision = all(run.params.get(k) == v for k, v in ours.items() if k.startswith("precision."))
            if same_precision and all(run.params.get(key, "") == value for key, value in row.setting):
                row.diverged.append(run)
