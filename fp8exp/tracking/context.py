"""The life of one MLflow run around training: opened (new, resumed, or in the offline store),
the config logged, and always closed with an honest status and the reason as tags."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from fp8exp.config import offline_uri, tracking_uri
from fp8exp.tracking import redact
from fp8exp.tracking.offline import Journal
from fp8exp.tracking.run import MlflowRun, NullRun, flatten
from fp8exp.tracking.store import create_run, fast_failing_http

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_run(cfg: DictConfig, run_name: str, tags: dict[str, str], resume_run_id: str | None = None,
             offline: bool = False, checkpoint_root: str | None = None,
             shield: Callable[[], Any] = contextlib.nullcontext, lead: bool = True,
             opened: Callable[[Any], None] = lambda run: None) -> Iterator[NullRun]:
    """Yields a run with the config logged; ends it FINISHED, KILLED on interrupt, else FAILED,
    with the reason as tags (`killed.*`, `failure.*`). `resume_run_id` continues that run
    (RUNNING again; its params are already there). `offline`: the server was unreachable at start
    and tracking.required=false, so the run goes to the offline store, marked for delivery.
    `shield`: a context in which closing the run (retries, the offline copy) is not cut short
    by the first stop signal. `lead=False`: a process other than 0 of a multi-process run, which
    logs nothing (process 0 owns the run). `opened(run)` is called as soon as the run exists, before
    its config is logged (another thread may end it from then on)."""
    if cfg.tracking.name == "none" or not lead:
        opened(run := NullRun(checkpoint_root if lead else None))
        yield run
        return

    with fast_failing_http():
        run = _open(cfg, run_name, tags, resume_run_id, offline)
        opened(run)
        status = "FAILED"
        monitor = None
        try:
            if cfg.tracking.get("system_metrics", True):
                from fp8exp.tracking import system
                monitor = system.start(run)
            if resume_run_id is None:
                resolved = OmegaConf.to_container(cfg, resolve=True)
                run.log_params(flatten(resolved))
                run.log_text(OmegaConf.to_yaml(redact.container(resolved)), "config.yaml")
            yield run
            status = "FINISHED"
        except KeyboardInterrupt as error:
            status = "KILLED"
            _tag_quietly(run, getattr(error, "tags", None) or {"killed.signal": "SIGINT"})
            raise
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            _tag_quietly(run, {"failure.error": f"{type(error).__name__}: {first_line}"[:1000],
                               **getattr(error, "tags", {})})
            raise
        finally:
            with shield():
                if monitor is not None:
                    monitor.finish()  # its last sample goes with the rest
                run.close(status, cfg)
            if offline:
                run.delivery_note = (f"The tracking server {tracking_uri(cfg)} was unreachable at start "
                                     f"(tracking.required=false): run {run.run_id} was logged to {run.uri}. "
                                     f"Deliver it when the server is up: python -m fp8exp.tracking_sync --from {run.uri}")
            if run.delivery_note:
                log.warning(run.delivery_note)


def _open(cfg: DictConfig, run_name: str, tags: dict[str, str], resume_run_id: str | None, offline: bool) -> MlflowRun:
    from mlflow.tracking import MlflowClient

    if resume_run_id is not None:
        uri = offline_uri(cfg) if offline else tracking_uri(cfg)
        if offline:  # it goes on in the offline store: deliver it (again) once it ends
            tags = {**tags, "fp8exp.sync.status": "pending", "fp8exp.sync.target_uri": tracking_uri(cfg)}
        client = MlflowClient(tracking_uri=uri)
        previous = client.get_run(resume_run_id)
        client.update_run(resume_run_id, "RUNNING")
        # How the last attempt ended moves into resume.history: a finished run has no killed.* tags.
        ended = {k: v for k, v in previous.data.tags.items() if k.startswith(("killed.", "failure."))}
        for key in ended:
            client.delete_tag(resume_run_id, key)
        count = int(previous.data.tags.get("resume.count", "0")) + 1
        history = previous.data.tags.get("resume.history", "")
        attempt = f"#{count}: {previous.info.status} " + " ".join(f"{k}={v}" for k, v in sorted(ended.items()))
        info = previous.info
        journal = Journal(cfg.tracking.experiment, info.run_name, info.start_time)
        run = MlflowRun(client, resume_run_id, uri, journal, info.artifact_uri)
        run.set_tags({**tags, "resume.count": str(count),
                      "resume.history": (f"{history}; {attempt}" if history else attempt)[-5000:]})
        return run
    uri = offline_uri(cfg) if offline else tracking_uri(cfg)
    if offline:
        tags = {**tags, "fp8exp.sync.status": "pending", "fp8exp.sync.target_uri": tracking_uri(cfg)}
    client, created = create_run(cfg, run_name, tags, uri)
    journal = Journal(cfg.tracking.experiment, created.info.run_name, created.info.start_time,
                      tags=dict(created.data.tags))
    return MlflowRun(client, created.info.run_id, uri, journal, created.info.artifact_uri)


def _tag_quietly(run: MlflowRun, tags: dict[str, str]) -> None:
    """Tags on the way out must not hide the error that ended the run."""
    try:
        run.set_tags(tags)
    except Exception as error:  # noqa: BLE001
        log.warning("could not tag run %s: %s", run.run_id, error)
