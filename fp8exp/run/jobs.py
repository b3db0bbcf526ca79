"""A sweep's jobs: expanded the way the basic sweeper will and validated before any starts (a bad
value fails the sweep up front, naming the job), and each job's own side: run, and how it ended
(a JobRecord in its output dir, for the summary at the end)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fp8exp.config import ConfigError, validate
from fp8exp.run.launch import override_key, run_name

log = logging.getLogger(__name__)

JOB_FILE = "fp8exp_job.json"  # in each job's output dir: how the job ended
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


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

    from fp8exp.run import processes
    from fp8exp.run.experiment import run_experiment

    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    record = JobRecord(hydra_cfg.job.num, run_name(cfg, context.swept), context.overrides, _log_file())
    lead = processes.detect(cfg.distribution).lead  # a job of several processes: process 0 records it

    def save(**fields) -> None:
        if lead:
            record.save(output_dir, **fields)

    save()
    try:
        outcome = run_experiment(cfg, context)
    except KeyboardInterrupt:
        save(status="KILLED", error="interrupted")
        raise
    except Exception as error:
        log.exception("job #%s (%s) failed", record.num, record.name)
        save(status="FAILED", error=f"{type(error).__name__}: {error}".splitlines()[0])
        return None
    if "test/perplexity" in outcome.metrics:  # task=causal_lm: the job's value is its test loss
        save(status="FINISHED", run_id=outcome.run_id, test_perplexity=outcome.metrics["test/perplexity"])
        return outcome.metrics["test/loss"]
    accuracy = outcome.metrics["test/accuracy"]
    save(status="FINISHED", run_id=outcome.run_id, test_accuracy=accuracy)
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
