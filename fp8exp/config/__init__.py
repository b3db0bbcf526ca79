"""Configuration: the typed schema (schema), the rules across fields (checks) and the default
stores (stores). Nothing here imports Keras, JAX or MLflow."""

from fp8exp.config.checks import ConfigError, validate
from fp8exp.config.schema import (
           DISTRIBUTIONS,
           FP8_SOURCE_POLICIES,
           PRECISIONS,
           TRACKERS,
           register_configs,
)
from fp8exp.config.stores import artifact_root, launch_dir, offline_uri, tracking_uri

__all__ = ["ConfigError", "validate", "register_configs", "PRECISIONS", "FP8_SOURCE_POLICIES", "TRACKERS",
           "DISTRIBUTIONS", "artifact_root", "launch_dir", "offline_uri", "tracking_uri"]
