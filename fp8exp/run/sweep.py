"""Multirun sweeps: one MLflow parent run per sweep, one child run per job, and a summary that
names the jobs that failed.

The launching process does the once-per-sweep work in a Hydra callback: it composes and
validates every job before any starts (a bad value fails the sweep up front, naming it), creates
the store, the experiment and the parent run (so parallel jobs never race to migrate SQLite), puts
the report on the parent at the end (fp8exp/report/parent.py; off: hydra.callbacks.sweep.report=false),
and ends the parent with an honest status. Jobs learn their sweep from a small JSON file in the sweep
dir rather than an environment variable: the file reaches in-process jobs, loky workers that
were spawned before the sweep began and any launcher that shares the file system alike, and it
stays on disk as the link from `multirun/...` to its MLflow run.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fp8exp.config import ConfigError, offline_uri, tracking_uri
from fp8exp.run import processes
from fp8exp.run.jobs import (
    JOB_FILE,
    JobRecord,
    job_overrides,
    validated_jobs,
    varying_keys,
)
from fp8exp.run.launch import (
    SWEEP_FILE,
    Sweep,
    git_state,
    interrupt_on_sigterm,
    source_tags,
)

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 5000  # MLflow caps tag values at 8000 characters


@dataclass
class SweepCallback(Callback):
    """Hydra callback (see conf/hydra/callbacks/sweep.yaml) for the launcher side of a sweep."""

    sweep: Sweep | None = None
    tracking: DictConfig | None = None
    uri: str | None = None
    """Where the parent run is: the tracking store, or the offline store when the server was away."""
    jobs: int | None = None
    """None: the sweeper (not the basic one) does not say up front how many jobs it launches."""
    status: str = "KILLED"
    """How the parent ends: KILLED unless on_multirun_end decides otherwise."""
    report: bool = True
    """At the end, put the report on the parent run (fp8exp/report/parent.py): its files under
    report/, summary/ metrics, the fp8exp.verdict tag and its description. Off with
    hydra.callbacks.sweep.report=false (conf/hydra/callbacks/sweep.yaml)."""
    parity_threshold: float = field(default=0.0025, repr=False)
    """The jobs' `report.parity_threshold` (set at the start): what the report judges loss parity by."""
    ended: bool = field(default=False, repr=False)
    warned: bool = field(default=False, repr=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._start(config)
        except ConfigError as error:
            # Same one line and exit status as a single run's bad setting (fp8exp/__main__.py).
            print(f"fp8exp: error: {error}", file=sys.stderr)
            sys.exit(2)
        except Exception as error:  # Hydra would only warn and run the jobs without a parent
            print(f"fp8exp: error: could not start the sweep: {type(error).__name__}: {error}", file=sys.stderr)
            sys.exit(1)

    def _start(self, config: DictConfig) -> None:
        jobs = job_overrides(config)
        composed = validated_jobs(config, jobs) if jobs else []
        launcher = str(config.hydra.runtime.choices.get("hydra/launcher"))
        if launcher in ("basic", "local_parallel") and any(processes.detect(cfg.distribution).many for cfg in composed):
            # Each process would run the whole sweep, with its own parent run and JAX runtime per job.
            raise ConfigError("distribution.num_processes", f"a sweep whose jobs run over several processes (set, or "
                              f"the cluster's tasks) needs a launcher that starts them (hydra/launcher=slurm or "
                              f"submitit_local with hydra.launcher.tasks_per_node), not hydra/launcher={launcher}; "
                              "or run each job as its own command on every process, or set "
                              "distribution.num_processes=1")
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:  # claimed atomically: two sweeps started in the same second must not share children
            (sweep_dir / SWEEP_FILE).open("x").close()
        except FileExistsError:
            raise ConfigError("hydra.sweep.dir", f"{sweep_dir} already holds a sweep (another one started in "
                              "the same second, or a rerun); pass hydra.sweep.dir=<a new directory>") from None
        self.jobs = len(jobs) if jobs is not None else None
        self.sweep = Sweep(str(sweep_dir), None, varying_keys(jobs or []))
        self.tracking = composed[0] if composed and composed[0].tracking.name != "none" else None
        if composed and composed[0].get("report") is not None:
            self.parity_threshold = float(composed[0].report.parity_threshold)
        if self.tracking is not None:
            from fp8exp.tracking.store import (
                check_reachable,
                create_run,
                fast_failing_http,
            )

            online = check_reachable(self.tracking)
            self.uri = tracking_uri(self.tracking) if online else offline_uri(self.tracking)
            name = f"{config.hydra.runtime.choices.get('sweep') or 'sweep'}-{datetime.now():%Y%m%d-%H%M%S}"
            sweep_overrides = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
            tags = {
                "sweep.overrides": " ".join(sweep_overrides + list(config.hydra.overrides.task)),
                "sweep.dir": str(sweep_dir),
                "sweep.varying": " ".join(self.sweep.varying),
                "sweep.jobs": str(self.jobs),
                "sweep.launcher": str(config.hydra.runtime.choices.get("hydra/launcher")),
                **git_state(),
                **source_tags(),
            }
            if not online:  # tracking.required=false: offline like a single run; the jobs nest under it there
                tags.update({"fp8exp.sync.status": "pending", "fp8exp.sync.target_uri": tracking_uri(self.tracking)})
            with fast_failing_http():
                self.sweep.parent_run_id = create_run(self.tracking, name, tags, self.uri)[1].info.run_id
        self.sweep.save()
        interrupt_on_sigterm()
        atexit.register(self._end_if_cut_short)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The summary and the exit status come first: the store failing now must not hide them."""
        records = self._records()
        failed = [r for r in records if r.status != "FINISHED"]
        missing = self.jobs - len(records) if self.jobs is not None else 0
        self.status = "FAILED" if failed or missing else "FINISHED"
        ran = f"{len(records)} of {self.jobs}" if self.jobs is not None else str(len(records))
        print(f"\nfp8exp sweep: {ran} jobs ran, {len(records) - len(failed)} finished, "
              f"{len(failed)} failed   ({self.sweep.dir})")
        print("\n".join(record.line() for record in records))
        parent = self.sweep.parent_run_id
        if parent and self.uri != tracking_uri(self.tracking):
            print(f"The tracking server was unreachable (tracking.required=false): parent run {parent} and its "
                  f"jobs are in {self.uri}. Deliver them when the server is up: "
                  f"python -m fp8exp.tracking_sync --from {self.uri}")
        elif parent:
            print(f"Parent run {parent} in experiment '{self.tracking.tracking.experiment}'. "
                  f"{'Report again' if self.report else 'Compare'}: python -m fp8exp.report --parent {parent}"
                  "   (or: make report)")
        self._end(records)  # first: a report that hangs or is killed must not leave the parent RUNNING
        if parent:
            self._report(parent, records)
        if self.status != "FINISHED":
            sys.exit(1)

    def _report(self, parent: str, records: list[JobRecord]) -> None:
        """The report on the parent, before it ends. Whatever goes wrong costs one line: the
        summary, the exit status and the parent's ending do not depend on it."""
        if not self.report:
            return
        if not any(record.status == "FINISHED" for record in records):
            print("No report on the parent run: no job finished.")
            return
        from mlflow.tracking import MlflowClient

        from fp8exp.report.parent import report_sweep
        from fp8exp.report.runs import ReportError
        from fp8exp.tracking import redact
        from fp8exp.tracking.store import fast_failing_http

        try:
            with fast_failing_http():
                _, out, verdict = report_sweep(MlflowClient(self.uri), parent,
                                               parity_threshold=self.parity_threshold)
        except ReportError as error:
            print(f"No report on the parent run: {error}")
        except Exception as error:  # noqa: BLE001
            reason = redact.text((str(error).splitlines() or [""])[0][:200])
            print(f"fp8exp: warning: no report on the sweep's parent run {parent} ({type(error).__name__}: "
                  f"{reason}); make it later: python -m fp8exp.report --tracking-uri {redact.text(self.uri)} "
                  f"--parent {parent}", file=sys.stderr)
        else:
            print(f"Report in {out}, on the parent run (report/, summary/ metrics, description): {verdict}")

    def _records(self) -> list[JobRecord]:
        found = (JobRecord(**json.loads(p.read_text())) for p in Path(self.sweep.dir).rglob(JOB_FILE))
        return sorted(found, key=lambda record: record.num)

    def _end_if_cut_short(self) -> None:
        """Ctrl-C, SIGTERM or a launcher error stopped the sweep before on_multirun_end, or the
        store failed there: one more try."""
        if not self.ended:
            self._end(self._records())

    def _end(self, records: list[JobRecord]) -> None:
        """End the parent run as `status`. A store that fails costs one warning line, not the
        summary or the exit status, and `ended` stays False so the exit hook tries again."""
        parent = self.sweep.parent_run_id if self.sweep else None
        if not parent:
            self.ended = True
            return
        from mlflow.tracking import MlflowClient

        from fp8exp.tracking import redact
        from fp8exp.tracking.store import fast_failing_http

        try:
            with fast_failing_http():
                client = MlflowClient(self.uri)
                experiment = client.get_run(parent).info.experiment_id
                # A child whose process died without a word (SIGKILL, out of memory) is still RUNNING.
                for child in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}' and "
                                                              "attributes.status = 'RUNNING'"):
                    client.set_terminated(child.info.run_id, "KILLED")
                failed = [f"#{r.num} {r.name} {r.status}: {r.error} (log: {r.log})"
                          for r in records if r.status != "FINISHED"]
                client.set_tag(parent, "sweep.finished", str(sum(r.status == "FINISHED" for r in records)))
                client.set_tag(parent, "sweep.failed", ("; ".join(failed) or "none")[:MAX_TAG_CHARS])
                client.set_terminated(parent, self.status)
        except Exception as error:  # noqa: BLE001
            if not self.warned:
                self.warned = True
                uri, reason = redact.text(self.uri), (str(error).splitlines() or [""])[0][:200]
                print(f"fp8exp: warning: could not end the sweep's parent run {parent} as {self.status} in {uri} "
                      f"({type(error).__name__}: {reason}); it may show RUNNING: once the store is back, run  "
                      f"python -c \"from mlflow import MlflowClient; MlflowClient('{uri}')"
                      f".set_terminated('{parent}', '{self.status}')\"", file=sys.stderr)
            return
        self.ended = True
