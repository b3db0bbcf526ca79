"""Typed experiment configuration: the schema Hydra checks overrides against, plus the
cross-field rules types cannot express. Imports nothing heavy, so bad input fails in well
under a second, before Keras, JAX or MLflow load."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "float8")
FP8_SOURCE_POLICIES = ("mixed_bfloat16", "float32", "mixed_float16")
TRACKERS = ("mlflow", "none")
DISTRIBUTIONS = ("none", "data_parallel", "model_parallel")


class ConfigError(ValueError):
    """A setting the user can fix; the message names the key and what would be valid."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass
class SyntheticDataConfig:
    name: str = "synthetic"
    vocabulary_size: int = 20000
    """Token ids are drawn from [2, vocabulary_size); 0 is padding, 1 unknown."""
    sequence_length: int = 200
    """Tokens per example after padding/truncation."""
    num_train: int = 2000
    num_validation: int = 500
    num_test: int = 500
    num_classes: int = 2
    """2 keeps the reference sigmoid head; more switches to a softmax head."""
    signal_tokens: int = 8
    """Class-marker tokens planted per example: fewer makes the task harder."""
    seed: int = 0
    """Generator seed: same seed, same data."""


IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"


@dataclass
class TextDataConfig:
    """Settings every real-text source shares: how text becomes token ids, and where the
    prepared splits are cached."""

    name: str = MISSING
    vocabulary_size: int = 20000
    """WordPiece vocabulary size, including [PAD] and [UNK]."""
    sequence_length: int = 200
    lowercase: bool = True
    cache_dir: Optional[str] = None
    """null = $FP8EXP_CACHE_DIR, else ~/.cache/fp8exp."""
    split_seed: int = 42
    """Seed of every split carved by fraction (the reference example's 42)."""
    validation_fraction: float = 0.2
    """Share of the training data held out for validation."""
    test_fraction: float = 0.2
    """Share carved out for testing when the source has no test split."""


@dataclass
class ImdbDataConfig(TextDataConfig):
    name: str = "imdb"
    url: str = IMDB_URL
    """Where aclImdb_v1.tar.gz is downloaded from (a mirror works)."""
    sha256: str = IMDB_SHA256
    path: Optional[str] = None
    """An already-extracted aclImdb directory: skips the download."""


@dataclass
class TextDirDataConfig(TextDataConfig):
    name: str = "text_dir"
    path: str = MISSING
    """A directory laid out as <split>/<class>/*.txt (split: train, optional test)."""


@dataclass
class TableDataConfig(TextDataConfig):
    name: str = "table"
    path: str = MISSING
    """A .csv, .tsv, .parquet or .jsonl file."""
    text_column: str = "text"
    label_column: str = "label"
    classes: Optional[list[str]] = None
    """Label values in class order; rows with other labels are dropped. null = all, sorted."""
    split_column: Optional[str] = None
    """Column holding train/validation/test per row; null = split by fraction."""
    validation_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class ModelConfig:
    preset: str = MISSING
    """Name of the size preset this came from (tiny|small|base|large); informational."""
    hidden_dim: int = MISSING
    """Embedding and attention width; must be divisible by num_heads."""
    num_heads: int = MISSING
    intermediate_dim: int = MISSING
    """Feed-forward width of each decoder block and of the classifier's hidden Dense."""
    num_layers: int = 1
    """Stacked TransformerDecoder blocks."""
    dropout: float = 0.1
    """In [0, 1)."""


@dataclass
class PrecisionConfig:
    name: str = MISSING
    """float32 | mixed_bfloat16 | mixed_float16 | float8."""
    source_policy: Optional[str] = None
    """float8 only: the policy the model is built under before quantize("float8")."""
    amax_history_length: Optional[int] = None
    """float8 only: amax history window per scaled tensor (Keras default 1024)."""
    skip: Optional[str] = None
    """float8 only: regex over layer paths to keep in high precision, e.g. `head`."""
    only: Optional[str] = None
    """float8 only: regex over layer paths; quantize just the Dense/EinsumDense layers it matches."""


@dataclass
class TrainerConfig:
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    """Adam learning rate."""
    seed: int = 42
    """Seeds Python, NumPy and the backend: weights, dropout and shuffling."""
    steps_per_epoch: Optional[int] = None
    """null = the whole training split each epoch; a small number makes smoke runs."""
    eval_steps: Optional[int] = None
    """null = the whole validation/test split; caps evaluation batches otherwise."""
    steps_per_execution: int = 1
    """Training steps fused into one compiled call (fewer host round trips)."""
    checkpoint_every: Optional[int] = 500
    """Write a checkpoint (weights, FP8 scales and amax histories, optimizer and metric state, RNG
    state, data position) into the MLflow run every N optimizer steps; null = only when a signal
    (SIGINT, SIGTERM, SIGUSR2) stops training."""
    resume: bool = False
    """Continue the latest KILLED or FAILED run of this exact config from its checkpoint; start a
    new run when there is none (so a preemptible job can always pass it)."""
    resume_from: Optional[str] = None
    """Continue this MLflow run id from its checkpoint (its settings must match)."""


@dataclass
class TrackingConfig:
    name: str = "mlflow"
    """mlflow | none (train and print only)."""
    uri: Optional[str] = None
    """MLflow tracking URI; null = sqlite:///<launch dir>/mlflow.db."""
    artifact_root: Optional[str] = None
    """Where a new experiment stores artifacts; null = <launch dir>/mlartifacts."""
    experiment: str = "fp8exp"
    run_name: Optional[str] = None
    """null = derived from precision and model size, e.g. float8-h512."""
    fp8_log_every: int = 100
    """Log FP8 scale/amax state every N optimizer steps (and at the end)."""
    fp8_probe: bool = True
    """At each FP8 log point, measure saturation, underflow and SQNR on one fixed batch."""
    fp8_gemm_check: bool = True
    """After training, compile one training step again to count the matmuls that really run in FP8
    (tag fp8.gemm). Costs one compilation (perf/fp8_gemm_check_s); false skips it."""
    fp8_warn_fraction: float = 0.01
    """Warn when more than this share of a tensor saturates or flushes to zero."""
    save_model: bool = True
    """Save the trained model as the run's artifact `model/`: the `.keras` file, its vocabulary and an
    MLflow pyfunc model that takes raw strings (for `python -m fp8exp.predict`, `python -m
    fp8exp.infer_bench`, `mlflow models serve`). false for large sweeps: a model per run adds up."""
    required: bool = True
    """An http(s) tracking server unreachable at start is an error; false = train and log to
    `offline_uri` instead (deliver later with `python -m fp8exp.tracking_sync`)."""
    retry_s: float = 30.0
    """At the end of a run, how long to keep retrying a tracking server that went away mid-run
    before writing the whole run to `offline_uri` (at most 5 s after SIGINT/SIGTERM)."""
    offline_uri: Optional[str] = None
    """Local store for runs a tracking server could not take; null = sqlite:///<launch dir>/mlflow-offline.db."""


@dataclass
class DistributionConfig:
    name: str = "none"
    """none | data_parallel | model_parallel (Keras distribution API over local devices)."""
    devices: Optional[int] = None
    """How many local devices to use; null = all."""
    mesh_shape: Optional[list[int]] = None
    """model_parallel only: [batch, model] device-mesh shape; null = [1, devices]."""


@dataclass
class Config:
    data: Any = MISSING
    model: ModelConfig = MISSING
    precision: PrecisionConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)


def register_configs() -> None:
    """Make the schemas visible to Hydra: the root one and one per data source."""
    cs = ConfigStore.instance()
    cs.store(name="fp8exp_schema", node=Config)
    for name, node in (("synthetic", SyntheticDataConfig), ("imdb", ImdbDataConfig),
                       ("text_dir", TextDirDataConfig), ("table", TableDataConfig)):
        cs.store(group="schema/data", name=name, node=node)


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


def launch_dir() -> str:
    """Where the command was started: Hydra (version_base 1.3) does not change directory."""
    return os.getcwd()


def tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.uri or f"sqlite:///{os.path.join(launch_dir(), 'mlflow.db')}"


def artifact_root(cfg: DictConfig) -> str:
    return cfg.tracking.artifact_root or os.path.join(launch_dir(), "mlartifacts")


def offline_uri(cfg: DictConfig) -> str:
    return cfg.tracking.get("offline_uri") or f"sqlite:///{os.path.join(launch_dir(), 'mlflow-offline.db')}"
