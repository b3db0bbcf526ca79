"""Where a run's tracking data goes when the config does not say: beside the launch directory."""

from __future__ import annotations

import os

from omegaconf import DictConfig


def launch_dir() -> str:
    """Where the command was started: Hydra (version_base 1.3) does not change directory."""
    return os.getcwd()


def tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.uri or f"sqlite:///{os.path.join(launch_dir(), 'mlflow.db')}"


def artifact_root(cfg: DictConfig) -> str:
    return cfg.tracking.artifact_root or os.path.join(launch_dir(), "mlartifacts")


def offline_uri(cfg: DictConfig) -> str:
    return cfg.tracking.get("offline_uri") or f"sqlite:///{os.path.join(launch_dir(), 'mlflow-offline.db')}"
