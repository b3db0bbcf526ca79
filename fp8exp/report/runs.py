"""The runs a report compares, read from MLflow: a sweep's children, or every run of an experiment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BASELINE = "mixed_bfloat16"
SEED_PARAMS = ("trainer.seed",)
PRECISION = "precision.name"
SIZE = "model.hidden_dim"
STEP_MS = "perf/step_time_ms"
VAL_LOSS = "val/loss"
"""Validation loss per epoch (step = epoch)."""
VAL_LOSS_STEP = "val/loss_step"
"""Validation loss every trainer.eval_every_steps optimizer steps (step = optimizer step), when logged."""


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
    start_time: int = 0
    end_time: int | None = None
    """Milliseconds since the epoch, as MLflow keeps them: which of two reruns is the later."""
    failure: str = ""
    """The run's `failure.reason` tag (`non_finite`: the loss or an FP8 scale diverged)."""

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


def run_data(run) -> RunData:
    return RunData(run.info.run_id, run.info.run_name, run.info.status, dict(run.data.params),
                   dict(run.data.metrics), run.data.tags.get("device", ""), run.info.start_time or 0,
                   run.info.end_time, run.data.tags.get("failure.reason", ""))


def find_source(client, parent: str | None, experiment: str | None) -> Source:
    from mlflow.exceptions import MlflowException

    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ReportError(f"no experiment named {experiment!r} in the store")
        runs = client.search_runs([found.experiment_id], "tags.`sweep.jobs` IS NULL", max_results=5000)
        return Source(f"experiment {experiment}", [run_data(r) for r in runs])
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
    return Source(f"sweep {sweep.info.run_name}", [run_data(r) for r in children], parent,
                  sweep.data.tags.get("sweep.dir"))


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def default_out_dir(source: Source) -> Path:
    """Beside the sweep's jobs when that folder is here; else under multirun/reports/."""
    if source.sweep_dir and Path(source.sweep_dir).is_dir():
        return Path(source.sweep_dir) / "report"
    return Path("multirun") / "reports" / slug(source.title)
