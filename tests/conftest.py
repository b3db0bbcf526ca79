"""Shared fixtures: configs composed the way `python -m fp8exp` composes them, shrunk so a
whole training run takes seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Many tests and their subprocesses compile the same tiny models: share XLA's persistent
# compilation cache between them (and between runs on one machine). Set before JAX loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "fp8exp" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import fp8exp  # noqa: F401  (sets the Keras backend before anything imports keras)
from fp8exp.config import register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small enough for seconds per run, big enough that the synthetic task is learned.
FAST = [
    "data=synthetic", "data.sequence_length=32", "data.num_train=512", "data.num_validation=128", "data.num_test=128",
    "data.vocabulary_size=500", "trainer.epochs=2", "trainer.batch_size=32",
]

register_configs()


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tracked(tmp: Path, *overrides: str) -> DictConfig:
    """A fast config that logs to a SQLite store inside `tmp`."""
    return compose_config(*FAST, f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                          f"tracking.artifact_root={tmp / 'artifacts'}", *overrides)


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m fp8exp ARGS` in a fresh interpreter, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fp8exp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


SHARED_DATA = ROOT.parent / "shared" / "data"
CLOTHING = SHARED_DATA / "clothing_reviews.parquet"
needs_clothing = pytest.mark.skipif(not CLOTHING.is_file(), reason=f"shared corpus {CLOTHING} is absent")


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the end-to-end tests: schema migrations run once."""
    return tmp_path_factory.mktemp("store")
