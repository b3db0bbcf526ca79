"""How a job was launched: its overrides, its Hydra output dir and the sweep it belongs to (what
tags and run names are made of), the source commit, and how a scheduler's SIGTERM ends it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig

SWEEP_FILE = "fp8exp_sweep.json"  # in the sweep dir: how jobs find their parent run


def override_key(override: str) -> str:
    """`+trainer.seed=1` -> `trainer.seed`."""
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class Sweep:
    """What a job learns about the sweep it belongs to."""

    dir: str
    parent_run_id: str | None
    varying: list[str]
    """Override keys whose value differs between jobs, in command-line order."""

    def save(self) -> None:
        Path(self.dir, SWEEP_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def of_job(cls, hydra_cfg: DictConfig) -> "Sweep | None":
        """The sweep of the running Hydra job, or None outside a sweep started by SweepCallback."""
        from hydra.types import RunMode

        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        path = Path(str(hydra_cfg.sweep.dir)).resolve() / SWEEP_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def values_in(self, overrides: list[str]) -> list[str]:
        """The overrides of one job that set a varying key: what tells the job apart."""
        return [o for o in overrides if override_key(o) in self.varying]

    def child_tags(self) -> dict[str, str]:
        tags = {"sweep.dir": self.dir}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags


@dataclass
class LaunchContext:
    """How the run was launched, for tags; empty when a config is composed in-process."""

    overrides: list[str] = field(default_factory=list)
    output_dir: str | None = None
    sweep: "Sweep | None" = None
    entry_point: str | None = None
    """The command that started the run (tag mlflow.source.name); None = this process's."""

    @classmethod
    def from_hydra(cls) -> "LaunchContext":
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        # Jobs of a launcher (joblib's workers, submitit's) run fp8exp's Hydra app all the same.
        return cls(list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir, Sweep.of_job(hydra_cfg),
                   entry_point="python -m fp8exp")

    @property
    def swept(self) -> list[str]:
        """This job's overrides of the keys its sweep varies, e.g. ['precision=float8', 'trainer.seed=1']."""
        return self.sweep.values_in(self.overrides) if self.sweep else []


# How a swept key shows in a run name; config groups show as their choice, other keys as leaf=value.
NAME_LABELS = {"model.hidden_dim": "h", "trainer.seed": "s"}


def run_name(cfg: DictConfig, swept: list[str] = ()) -> str:
    """`tracking.run_name`, else precision (with float8's recipe unless delayed) and width plus
    whatever else the sweep varies for this job (`swept`: its overrides of the varying keys), e.g.
    float8-h256-s1, float8_block-h256-s1."""
    if cfg.tracking.get("run_name"):
        return cfg.tracking.run_name
    recipe = cfg.precision.get("recipe")
    precision = cfg.precision.name + (f"_{recipe}" if recipe and recipe != "delayed" else "")  # float8_block
    parts = [precision, f"h{cfg.model.hidden_dim}"]
    for override in swept:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("precision", "precision.name", "precision.recipe", "model.hidden_dim"):
            continue
        parts.append(NAME_LABELS[key] + value if key in NAME_LABELS
                     else value if "." not in key else f"{key.rsplit('.', 1)[1]}={value}")
    return "-".join(parts)


def git_state() -> dict[str, str]:
    """Commit of the fp8exp checkout and whether it had uncommitted changes."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def entry_point() -> str:
    """This process's command: `python -m <module>` or the script's path (as MLflow names it)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name.removesuffix(".__main__")
        return f"python -m {module}"
    return sys.argv[0] or "python"


def source_tags(entry: str | None = None) -> dict[str, str]:
    """What the MLflow UI's Source column shows: the entry point, `JOB` under a scheduler (SLURM),
    else `LOCAL` (with `mlflow.source.git.commit` from git_state, the commit)."""
    return {"mlflow.source.name": entry or entry_point(),
            "mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL"}


def interrupt_on_sigterm() -> None:
    """A scheduler's SIGTERM ends the run like Ctrl-C does: KILLED, not left RUNNING. (Inside
    run_experiment, stopping.GracefulStop takes over: the current step finishes and a
    checkpoint is written first.)"""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
