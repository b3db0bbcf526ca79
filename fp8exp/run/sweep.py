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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fp8exp.config import ConfigError, offline_uri, tracking_uri, validate
from fp8exp.run.launch import (
    SWEEP_FILE,
    Sweep,
    git_state,
    interrupt_on_sigterm,
    override_key,
    run_name,
    source_tags,
)

log = logging.getLogger(__name__)

JOB_FILE = "fp8exp_job.json"  # in each job's output dir: how the job ended
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
MAX_TAG_CHARS = 5000  # MLflow caps tag values at 8000 characters


@dataclass
class JobRecord:
    """How one job ended, written into its output dir for the end-of-sweep summary."""

    num: int
    name: str
    overrides: list[str]
    log: str | None
    status: str = "RUNNING"
    run_id: str | None = None
    error: str | None = None
    test_accuracy: float | None = None
    test_perplexity: float | None = None
    """task=causal_lm jobs: their result (they have no accuracy worth a sweep line)."""

    def save(self, output_dir: str, **changes: Any) -> None:
        self.__dict__.update(changes)
        Path(output_dir, JOB_FILE).write_text(json.dumps(asdict(self), indent=1))

    def line(self) -> str:
        if self.status != "FINISHED":
            result = self.error or ""
        elif self.test_perplexity is not None:
            result = f"test perplexity {self.test_perplexity:.2f}"
        else:
            result = f"test accuracy {self.test_accuracy:.4f}"
        where = f"   log: {self.log}" if self.status != "FINISHED" and self.log else ""
        return f"  #{self.num:<3} {self.status:<9} {self.name:<28} {result}{where}"


def _log_file() -> str | None:
    """The file Hydra's job logging writes, whatever the logging config names it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def run_job(cfg: DictConfig, context) -> float | None:
    """One job of a sweep: a failure is logged and recorded, not raised, so the launcher goes
    on with the other jobs (the child run itself already ends FAILED). Ctrl-C or SIGTERM still
    stops the sweep."""
    from hydra.core.hydra_config import HydraConfig

    from fp8exp.run.experiment import run_experiment

    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    record = JobRecord(hydra_cfg.job.num, run_name(cfg, context.swept), context.overrides, _log_file())
    record.save(output_dir)
    try:
        outcome = run_experiment(cfg, context)
    except KeyboardInterrupt:
        record.save(output_dir, status="KILLED", error="interrupted")
        raise
    except Exception as error:
        log.exception("job #%s (%s) failed", record.num, record.name)
        record.save(output_dir, status="FAILED", error=f"{type(error).__name__}: {error}".splitlines()[0])
        return None
    if "test/perplexity" in outcome.metrics:  # task=causal_lm: the job's value is its test loss
        record.save(output_dir, status="FINISHED", run_id=outcome.run_id,
                    test_perplexity=outcome.metrics["test/perplexity"])
        return outcome.metrics["test/loss"]
    accuracy = outcome.metrics["test/accuracy"]
    record.save(output_dir, status="FINISHED", run_id=outcome.run_id, test_accuracy=accuracy)
    return accuracy


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, expanded the way the basic sweeper will expand them (its `params`
    from a `+sweep=` config first, the command line after); None for other sweepers."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides(params + list(config.hydra.overrides.task))
    return BasicSweeper.split_arguments(overrides, max_batch_size=None)[0]


def varying_keys(jobs: list[list[str]]) -> list[str]:
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            values.setdefault(override_key(override), set()).add(override)
    return [key for key, seen in values.items() if len(seen) > 1]


def _composition_problem(error: Exception) -> str:
    """Hydra's multi-line composition error as one line, with the valid options if it has them."""
    problem = str(error).strip().splitlines()[0]
    options = getattr(error, "options", None)
    return f"{problem}; valid: {', '.join(options)}" if options else problem


def validated_jobs(config: DictConfig, jobs: list[list[str]]) -> list[DictConfig]:
    """Compose and validate every job now, so a bad value fails the sweep before any job runs."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    loader = GlobalHydra.instance().config_loader()
    composed = []
    for num, overrides in enumerate(jobs):
        job = " ".join(overrides)
        try:
            cfg = loader.load_sweep_config(config, list(overrides))
        except (HydraException, OmegaConfBaseException) as error:
            raise ConfigError(f"sweep job #{num} ({job})", _composition_problem(error)) from None
        try:
            validate(cfg)
        except ConfigError as error:
            raise ConfigError(error.key, f"{str(error).split(': ', 1)[1]} (sweep job #{num}: {job})") from None
        composed.append(cfg)
    for key in ("tracking.name", "tracking.uri", "tracking.experiment"):
        if len({str(OmegaConf.select(cfg, key)) for cfg in composed}) > 1:
            raise ConfigError(key, "must be the same for every job of a sweep (they share one parent run)")
    return composed


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
        if self.tracking is not None:
            from fp8exp.tracking.store import check_reachable, create_run, fast_failing_http

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
                _, out, verdict = report_sweep(MlflowClient(self.uri), parent)
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
