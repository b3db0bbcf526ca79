"""The cross-field rules types cannot express. Runs before Keras, JAX or MLflow load, so bad
input fails in well under a second, in one line naming the setting and what is valid."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from fp8exp.config.schema import (
    DISTRIBUTIONS,
    FP8_SOURCE_POLICIES,
    PRECISIONS,
    TRACKERS,
)


class ConfigError(ValueError):
    """A setting the user can fix; the message names the key and what would be valid."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key


def _positive(cfg: DictConfig, *keys: str, optional: bool = False) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is None and optional:
            continue
        if value is None or value <= 0:
            valid = "a positive integer or null" if optional else "a positive number"
            raise ConfigError(key, f"got {value!r}, expected {valid}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first setting that cannot work; types are checked by the schema."""
    precision = cfg.precision
    if precision.name not in PRECISIONS:
        raise ConfigError("precision.name", f"unknown precision {precision.name!r}; valid: {', '.join(PRECISIONS)}")
    if precision.name == "float8":
        if precision.source_policy not in FP8_SOURCE_POLICIES:
            raise ConfigError("precision.source_policy",
                              f"got {precision.source_policy!r}; valid: {', '.join(FP8_SOURCE_POLICIES)}")
        _positive(cfg, "precision.amax_history_length")
        for key in ("skip", "only"):
            pattern = precision[key]
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError(f"precision.{key}", f"{pattern!r} is not a valid regular expression ({error})")
    else:
        for key in ("source_policy", "amax_history_length", "skip", "only"):
            if precision[key] is not None:
                raise ConfigError(f"precision.{key}",
                                  f"only applies to precision=float8, not {precision.name}; remove it")

    _positive(cfg, "data.vocabulary_size", "data.sequence_length")
    if cfg.data.vocabulary_size < 3:
        raise ConfigError("data.vocabulary_size", f"got {cfg.data.vocabulary_size}, needs at least 3 (pad, unknown, one token)")
    if cfg.data.name in ("text_dir", "table") and OmegaConf.is_missing(cfg.data, "path"):
        kind = "a directory of <split>/<class>/*.txt" if cfg.data.name == "text_dir" else \
            "a .csv, .tsv, .parquet or .jsonl file"
        raise ConfigError("data.path", f"required for data={cfg.data.name}: {kind}")
    if cfg.data.name != "synthetic":
        for key in ("validation_fraction", "test_fraction"):
            if not 0.0 < cfg.data[key] < 1.0:
                raise ConfigError(f"data.{key}", f"got {cfg.data[key]}, expected a value in (0, 1)")
        if cfg.data.validation_fraction + cfg.data.test_fraction >= 1.0:
            raise ConfigError("data.test_fraction", "data.validation_fraction + data.test_fraction "
                              "must leave some data for training (sum below 1)")
    if cfg.data.name == "imdb":
        _positive(cfg, "data.max_download_bytes", optional=True)
    if cfg.data.name == "synthetic":
        _positive(cfg, "data.num_train", "data.num_validation", "data.num_test", "data.signal_tokens")
        if cfg.data.num_classes < 2:
            raise ConfigError("data.num_classes", f"got {cfg.data.num_classes}, expected 2 or more")
        if cfg.data.num_classes * cfg.data.signal_tokens + 2 >= cfg.data.vocabulary_size:
            raise ConfigError("data.vocabulary_size",
                              f"{cfg.data.vocabulary_size} is too small for {cfg.data.num_classes} classes "
                              f"x {cfg.data.signal_tokens} signal tokens")

    model = cfg.model
    _positive(cfg, "model.hidden_dim", "model.num_heads", "model.intermediate_dim", "model.num_layers")
    if model.hidden_dim % model.num_heads:
        raise ConfigError("model.hidden_dim",
                          f"{model.hidden_dim} is not divisible by model.num_heads={model.num_heads}; "
                          f"pick a multiple of {model.num_heads} or change model.num_heads")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError("model.dropout", f"got {model.dropout}, expected a value in [0, 1)")

    _positive(cfg, "trainer.epochs", "trainer.batch_size", "trainer.learning_rate", "trainer.steps_per_execution")
    _positive(cfg, "trainer.steps_per_epoch", "trainer.eval_steps", "trainer.checkpoint_every", optional=True)
    if cfg.trainer.stale_after_s < 180:
        raise ConfigError("trainer.stale_after_s", f"got {cfg.trainer.stale_after_s}, expected at least 180 seconds "
                          "(three missed heartbeats): a live run must not look gone")
    if (cfg.trainer.resume or cfg.trainer.resume_from) and cfg.tracking.name == "none":
        key = "trainer.resume_from" if cfg.trainer.resume_from else "trainer.resume"
        raise ConfigError(key, "needs tracking=mlflow: checkpoints live in the MLflow run")

    distribution = cfg.distribution
    if distribution.name not in DISTRIBUTIONS:
        raise ConfigError("distribution.name", f"unknown distribution {distribution.name!r}; "
                          f"valid: {', '.join(DISTRIBUTIONS)}")
    _positive(cfg, "distribution.devices", optional=True)
    if distribution.mesh_shape is not None:
        if distribution.name != "model_parallel":
            raise ConfigError("distribution.mesh_shape", f"only applies to distribution=model_parallel, "
                              f"not {distribution.name}; remove it")
        if len(distribution.mesh_shape) != 2 or min(distribution.mesh_shape) < 1:
            raise ConfigError("distribution.mesh_shape", f"got {list(distribution.mesh_shape)}, expected "
                              "[batch, model] with positive sizes")

    if cfg.tracking.name not in TRACKERS:
        raise ConfigError("tracking.name", f"unknown tracker {cfg.tracking.name!r}; valid: {', '.join(TRACKERS)}")
    _positive(cfg, "tracking.fp8_log_every")
    if not 0.0 <= cfg.tracking.fp8_warn_fraction <= 1.0:
        raise ConfigError("tracking.fp8_warn_fraction", f"got {cfg.tracking.fp8_warn_fraction}, expected a value in [0, 1]")
    if not str(cfg.tracking.experiment).strip():
        raise ConfigError("tracking.experiment", "must not be empty")
    if cfg.tracking.name != "none" and cfg.tracking.retry_s < 0:
        raise ConfigError("tracking.retry_s", f"got {cfg.tracking.retry_s}, expected 0 or more seconds")
