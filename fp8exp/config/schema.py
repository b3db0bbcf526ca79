"""Typed experiment configuration: the schema Hydra checks overrides against, one dataclass per
config group with a docstring per field. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fp8exp.config.precision import PrecisionConfig

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "float8")
FP8_SOURCE_POLICIES = ("mixed_bfloat16", "float32", "mixed_float16")
TRACKERS = ("mlflow", "none")
DISTRIBUTIONS = ("none", "data_parallel", "model_parallel", "fsdp")


@dataclass
class SyntheticDataConfig:
    name: str = "synthetic"
    vocabulary_size: int = 20000
    """Token ids are drawn from [2, vocabulary_size); 0 is padding, 1 unknown."""
    sequence_length: int = 200
    """Tokens per example after padding/truncation."""
    num_train: int = 2000
    """Examples per split (task=causal_lm: generated documents, packed into windows)."""
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
    """Tokenizer vocabulary size: WordPiece (classify) including [PAD] and [UNK]; byte-level BPE
    (causal_lm) including the 256 bytes and <|endoftext|>."""
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
    max_download_bytes: Optional[int] = 1 << 30
    """Most bytes data.url may send (the real archive is 84 MB); extraction stops at 4x this much
    unpacked. Guards the disk against a wrong URL or a decompression bomb; null = no limit."""
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


# `model.family` values: the reference classifier, and keras-hub backbones built from config.
MODEL_FAMILIES = ("classifier", "gpt2", "llama", "gemma", "bert")
DECODER_FAMILIES = ("gpt2", "llama", "gemma")
"""Decoder-only families: the ones that can do causal language modelling."""
BACKBONE_CLASSES = {"gpt2": "GPT2Backbone", "llama": "LlamaBackbone", "gemma": "GemmaBackbone",
                    "bert": "BertBackbone"}
"""The keras-hub class each family builds; a preset's config.json must name the same one."""
FAMILY_TASKS = {"classifier": ("classify",), "gpt2": ("classify", "causal_lm"),
                "llama": ("classify", "causal_lm"), "gemma": ("classify", "causal_lm"), "bert": ("classify",)}
"""Which family can do which task: causal language modelling needs a decoder-only family."""


@dataclass
class ModelConfig:
    size: str = MISSING
    """Which size of the family this is (classifier: tiny|small|base|large; gpt2/llama/gemma/bert:
    tiny|small|base); informational. See model_name() for the `model` MLflow tag."""
    family: str = "classifier"
    """classifier (the reference Keras example's network, fp8exp/models/classifier.py) | gpt2 | llama |
    gemma (decoder-only keras-hub backbones) | bert (encoder-only keras-hub backbone)."""
    hidden_dim: int = MISSING
    """Embedding and attention width; must be divisible by num_heads (gemma with head_dim set: any)."""
    num_heads: int = MISSING
    """Attention heads; for llama/gemma the query heads."""
    intermediate_dim: int = MISSING
    """Feed-forward width of each block (classifier: also its hidden Dense; gemma: keras-hub's
    convention, twice the width of each of its two gated projections, so it must be even)."""
    num_layers: int = 1
    """Stacked Transformer blocks."""
    dropout: float = 0.1
    """In [0, 1)."""
    num_key_value_heads: Optional[int] = None
    """llama/gemma only: key/value heads (grouped-query attention; 1 = multi-query); must divide
    num_heads. null = num_heads (plain multi-head attention). Must stay null for other families."""
    head_dim: Optional[int] = None
    """gemma only: width of each attention head, free of hidden_dim (Gemma 2B: 256 with hidden 2048
    and 8 heads). null = hidden_dim / num_heads. Must stay null for other families."""
    max_sequence_length: Optional[int] = None
    """keras-hub families: the longest data.sequence_length the model takes. gpt2/bert: the size of
    the learned position table; llama/gemma (rotary positions): a limit checked before training.
    Must stay null for the classifier, which is built for data.sequence_length."""
    preset: Optional[str] = None
    """keras-hub families only: a preset directory on disk, as `Backbone.save_to_preset` writes it
    (config.json, model.weights.h5), to start from its architecture and weights instead of random
    ones; it must hold a model.family backbone. Its config.json then fixes the architecture: the
    size keys above are not used. Never downloaded: only local directories. null = random weights."""


def model_name(model: Any) -> str:
    """What the `model` MLflow tag calls this model: the conf/model choice it came from (`tiny`,
    `llama_small`). A preset it starts from is the param `model.preset`."""
    return model.size if model.family == "classifier" else f"{model.family}_{model.size}"


TASKS = ("classify", "causal_lm")


@dataclass
class TaskConfig:
    """What the model learns (conf/task/)."""

    name: str = "classify"
    """classify (token ids -> a label; accuracy) | causal_lm (next-token prediction on packed windows
    of data.sequence_length + 1 tokens; loss and perplexity; gpt2/llama/gemma only, see FAMILY_TASKS)."""


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
    eval_every_steps: Optional[int] = None
    """Also validate every N optimizer steps (`val/loss_step` etc., MLflow step = optimizer step),
    for loss curves finer than one point per epoch; null = per epoch only."""
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
    stale_after_s: float = 3600.0
    """trainer.resume also takes a RUNNING run of this config whose process is gone (killed by
    SIGKILL or the OOM killer): one on this host (same pid namespace) whose pid is not alive, or,
    elsewhere, one whose heartbeat (tag fp8exp.heartbeat, every minute while training and
    validating, not during the final evaluation and saving) is older than this. It is marked
    KILLED first. At least 180 (three missed heartbeats)."""


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
    log_every_steps: Optional[int] = None
    """Log `train/loss_step` (and the other training metrics) every N optimizer steps: their mean
    over those N steps, at MLflow step = optimizer step; null = per epoch only."""
    fp8_log_every: int = 100
    """Log FP8 scale/amax state every N optimizer steps (and at the end)."""
    fp8_probe: bool = True
    """At each FP8 log point, measure saturation, underflow and SQNR on one fixed batch."""
    fp8_whatif: bool = True
    """With fp8_probe, at each FP8 log point: what every FP8 recipe (and NVFP4) would make of each quantized
    layer's input, kernel and output gradient on the probe batch (saturation, underflow, SQNR), as
    fp8/whatif/step_<N>.csv, and at the end fp8/whatif/summary.csv and the heat map fp8/whatif/sqnr.png."""
    fp8_gemm_check: bool = True
    """After training, compile one training step again to count the matmuls that really run in FP8
    (tag fp8.gemm). Costs one compilation (perf/fp8_gemm_check_s); false skips it."""
    fp8_warn_fraction: float = 0.01
    """Warn when more than this share of a tensor saturates or flushes to zero."""
    save_model: bool = True
    """Save the trained model as the run's MLflow LoggedModel `model` (the Models tab, `models:/<model_id>`,
    `runs:/<run_id>/model`; the run's plain artifact `model/` when the store cannot take one: offline,
    or a server away): the `.keras` file, its vocabulary and an MLflow pyfunc model that takes raw
    strings (for `python -m fp8exp.predict`, `python -m fp8exp.infer_bench`, `mlflow models serve`).
    false for large sweeps: a model per run adds up."""
    register_model: Optional[str] = None
    """Register the saved model in the Model Registry under this name (a new version per run, tagged
    with its precision); null = do not register."""
    system_metrics: bool = True
    """Sample CPU, memory, disk, network and (with pynvml) GPU utilisation and memory every 10 s with
    MLflow's system-metrics monitor, as `system/...` metrics (the UI's System metrics charts), sent
    through the run's queue (an offline run keeps them in the offline store). false = none."""
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
    """none | data_parallel | model_parallel | fsdp (Keras distribution API over the devices of every process)."""
    devices: Optional[int] = None
    """How many local devices to use; null = all."""
    mesh_shape: Optional[list[int]] = None
    """model_parallel only: [batch, model] device-mesh shape; null = [1, devices]."""
    coordinator: Optional[str] = None
    """Several processes, one run: host:port of process 0 (every process passes the same).
    null = one process, or the cluster's (SLURM with several tasks: JAX detects it)."""
    num_processes: Optional[int] = None
    """How many processes train this run; null = 1, or the cluster's."""
    process_id: Optional[int] = None
    """This process's index, 0 .. num_processes-1; process 0 owns the MLflow run. null = the cluster's."""
    timeout_s: float = 300.0
    """How long processes wait for each other at start-up before one line says who is missing."""


@dataclass
class ReportConfig:
    """What the sweep's report on its parent run judges by (the same as `python -m fp8exp.report`'s options)."""

    parity_threshold: float = 0.0025
    """Language models: FP8 is at parity with mixed_bfloat16 when the 95% CI of its relative final
    validation loss error (loss_fp8 / loss_bf16 - 1, paired by seed) lies below +threshold; a
    fraction, 0.0025 = 0.25% (DeepSeek-V3's figure). `--parity-threshold` of fp8exp.report."""


@dataclass
class Config:
    data: Any = MISSING
    model: ModelConfig = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    precision: PrecisionConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def register_configs() -> None:
    """Make the schemas visible to Hydra: the root one and one per data source."""
    cs = ConfigStore.instance()
    cs.store(name="fp8exp_schema", node=Config)
    for name, node in (("synthetic", SyntheticDataConfig), ("imdb", ImdbDataConfig),
                       ("text_dir", TextDirDataConfig), ("table", TableDataConfig)):
        cs.store(group="schema/data", name=name, node=node)
    for name in TASKS:
        cs.store(group="schema/task", name=name, node=TaskConfig(name=name))
