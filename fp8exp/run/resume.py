"""Which run and checkpoint `trainer.resume` / `trainer.resume_from` continue: the same settings
(a hash of every param that changes what is trained), an ended run, a readable checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fp8exp.config import ConfigError, offline_uri, tracking_uri
from fp8exp.run.checkpoint import ARTIFACT, CheckpointError, TrainingState, read
from fp8exp.tracking import redact
from fp8exp.tracking.callbacks import HEARTBEAT_TAG, HOST_TAG, PID_TAG, PIDNS_TAG, pid_namespace
from fp8exp.tracking.run import flatten

log = logging.getLogger(__name__)

# Settings that do not change what is trained: they may differ between a run and its resumption.
NOT_COMPARED = {"trainer.resume", "trainer.resume_from", "tracking.uri", "tracking.artifact_root",
                "tracking.run_name", "tracking.required", "tracking.retry_s", "tracking.offline_uri",
                "data.cache_dir", "data.max_download_bytes", "trainer.stale_after_s", "tracking.system_metrics",
                "tracking.register_model", "tracking.log_every_steps", "trainer.eval_every_steps",
                "report.parity_threshold", "distribution.coordinator", "distribution.process_id",
                "distribution.timeout_s", "distribution.num_processes"}
"""Left out of the hash too: the process count (a checkpoint holds the whole state, gathered, so
it resumes on any count; and the key, new, must not change the hash of every earlier run)."""
RESUMABLE = ("KILLED", "FAILED")


def logged_params(cfg: DictConfig) -> dict[str, str]:
    """The run's params, masked as logged."""
    return redact.flat(flatten(OmegaConf.to_container(cfg, resolve=True)))


def comparable_params(cfg: DictConfig) -> dict[str, str]:
    """The run's params (masked as logged) that must match for a resumption."""
    return {key: value for key, value in logged_params(cfg).items() if key not in NOT_COMPARED}


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(comparable_params(cfg), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Resume:
    run_id: str
    state: TrainingState
    status: str


def _checkpointed_candidates(client, cfg: DictConfig) -> list:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`fp8exp.config_hash` = '{config_hash(cfg)}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    runs = [run for run in runs if "checkpoint.step" in run.data.tags and run.data.tags.get("failure.reason") != "non_finite"]
    resumable = []
    for run in runs:
        if run.info.status == "RUNNING" and process_gone(run, cfg.trainer.stale_after_s):
            why = (f"process gone (pid {run.data.tags.get(PID_TAG, '?')} on {run.data.tags.get(HOST_TAG, '?')}, "
                   f"last heartbeat {run.data.tags.get(HEARTBEAT_TAG, 'never')})")
            log.warning("Run %s is RUNNING but its %s: marking it KILLED", run.info.run_id, why)
            client.set_tag(run.info.run_id, "killed.reason", why)
            client.set_terminated(run.info.run_id, "KILLED")
            run = client.get_run(run.info.run_id)
        if run.info.status in RESUMABLE:
            resumable.append(run)
    return resumable


def process_gone(run, stale_after_s: float) -> bool:
    """A RUNNING run nobody runs any more: its process on this host is not alive, or its last
    heartbeat (or its start, if it never beat) is older than `stale_after_s`."""
    tags = run.data.tags
    if tags.get(HOST_TAG) == socket.gethostname() and tags.get(PIDNS_TAG) == pid_namespace() \
            and tags.get(PID_TAG, "").isdigit():  # the same pid space: the pid alone decides
        try:
            os.kill(int(tags[PID_TAG]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False
    last = float(tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
    return time.time() - last > stale_after_s


def find_resume(cfg: DictConfig, online: bool = True) -> Resume | None:
    """The run and checkpoint `trainer.resume` / `trainer.resume_from` point at; None when
    `resume=true` finds nothing to continue. ConfigError for a run that cannot be resumed.
    `online=False` (the server is unreachable, tracking.required=false): the run to continue is
    looked for in the offline store, where it goes on; with none there, resuming is refused
    rather than quietly starting over beside a checkpoint nobody can read."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not online:
        return _find_offline(cfg)
    client = MlflowClient(tracking_uri(cfg))
    if cfg.trainer.resume_from:
        key = "trainer.resume_from"
        try:
            run = client.get_run(cfg.trainer.resume_from)
        except MlflowException:
            raise ConfigError(key, f"no run {cfg.trainer.resume_from} in {redact.text(tracking_uri(cfg))}") from None
        if run.info.status == "FINISHED":
            raise ConfigError(key, f"run {run.info.run_id} already FINISHED; nothing to resume")
        current = comparable_params(cfg)
        differing = [f"{k}={run.data.params[k]} (now {current[k]})" for k in sorted(current)
                     if k in run.data.params and run.data.params[k] != current[k]]
        if differing:
            raise ConfigError(key, f"run {run.info.run_id} was started with different settings: "
                              f"{', '.join(differing)}; resume with the same ones")
    else:
        key = "trainer.resume"
        candidates = _checkpointed_candidates(client, cfg)
        if not candidates:
            log.info("trainer.resume: no KILLED or FAILED run (or RUNNING one whose process is gone) of this config with a checkpoint in "
                     "experiment '%s'; starting a new run", cfg.tracking.experiment)
            return None
        run = candidates[0]
    return _download(client, run, key, cfg)


def _find_offline(cfg: DictConfig) -> Resume:
    from mlflow.tracking import MlflowClient

    key = "trainer.resume_from" if cfg.trainer.resume_from else "trainer.resume"
    where = offline_uri(cfg)
    path = where[len("sqlite:///"):] if where.startswith("sqlite:///") else None
    found = None
    if path is None or Path(path).is_file():
        client = MlflowClient(where)
        candidates = [run for run in _checkpointed_candidates(client, cfg)
                      if run.data.tags.get("fp8exp.sync.status") != "done"  # the server's copy is newer
                      and (not cfg.trainer.resume_from or cfg.trainer.resume_from in
                           (run.info.run_id, run.data.tags.get("fp8exp.sync.remote_run_id")))]
        found = candidates[0] if candidates else None
    if found is None:
        raise ConfigError(key, f"the tracking server {redact.text(tracking_uri(cfg))} is unreachable and the offline store {where} "
                          "holds no checkpointed run of this config to continue; start the server (or fix "
                          "tracking.uri) to resume from its checkpoint, or pass trainer.resume=false to start a new run")
    log.warning("trainer.resume: the tracking server %s is unreachable: continuing run %s from its checkpoint in the "
                "offline store %s; deliver it later with python -m fp8exp.tracking_sync --from %s",
                redact.text(tracking_uri(cfg)), found.info.run_id, where, where)
    return _download(client, found, key, cfg)


def _download(client, run, key: str, cfg: DictConfig) -> Resume:
    """Fetch and verify the run's checkpoint."""
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="fp8exp-resume-") as tmp:
        try:
            path = Path(client.download_artifacts(run.info.run_id, ARTIFACT, tmp))
        except (MlflowException, OSError) as error:
            raise ConfigError(key, f"run {run.info.run_id} has no readable checkpoint ({ARTIFACT}): "
                              f"{str(error).splitlines()[0]}") from None
        try:
            state = read(path)
        except CheckpointError as error:
            raise ConfigError(key, str(error)) from None
    if state.meta["config_hash"] != config_hash(cfg) and not cfg.trainer.resume_from:
        raise ConfigError(key, f"the checkpoint of run {run.info.run_id} was written by other settings")
    log.info("Resuming MLflow run %s (%s) from its checkpoint at step %d (epoch %d, batch %d)",
             run.info.run_id, run.info.status, state.step, state.meta["epoch"] + 1, state.meta["batch"])
    return Resume(run.info.run_id, state, run.info.status)
