"""The cross-field rules types cannot express. Runs before Keras, JAX or MLflow load, so bad
input fails in well under a second, in one line naming the setting and what is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fp8exp.config.distribution import check_distribution
from fp8exp.config.errors import ConfigError
from fp8exp.config.precision import FP8_RECIPES, GRAD_FORMATS, RECIPE_KEYS, WHATIF_ONLY_RECIPES
from fp8exp.config.schema import (
    BACKBONE_CLASSES,
    DECODER_FAMILIES,
    FAMILY_TASKS,
    FP8_SOURCE_POLICIES,
    MODEL_FAMILIES,
    PRECISIONS,
    TASKS,
    TRACKERS,
)


def _positive(cfg: DictConfig, *keys: str, optional: bool = False) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is None and optional:
            continue
        if value is None or value <= 0:
            valid = "a positive integer or null" if optional else "a positive number"
            raise ConfigError(key, f"got {value!r}, expected {valid}")


def _check_recipe(cfg: DictConfig) -> None:
    precision = cfg.precision
    recipe = precision.get("recipe") or "delayed"
    if recipe not in FP8_RECIPES:
        what = "is for what-if numerics only (tracking.fp8_whatif), not training" if recipe in WHATIF_ONLY_RECIPES \
            else "is not an FP8 recipe"
        raise ConfigError("precision.recipe", f"{recipe!r} {what}; valid: {', '.join(FP8_RECIPES)}")
    for key in ("amax_history_length", *RECIPE_KEYS[1:]):
        if precision.get(key) is None or key in FP8_RECIPES[recipe]:
            continue
        if key == "amax_history_length":
            raise ConfigError("precision.amax_history_length", "only applies to precision.recipe=delayed (Keras' "
                              f"amax history), not {recipe}, which scales from the current tensor; remove it")
        raise ConfigError(f"precision.{key}", f"precision.recipe={recipe} does not take {key}; its options: "
                          f"{', '.join(FP8_RECIPES[recipe])}")
    if precision.get("margin") is not None and precision.margin < 0:
        raise ConfigError("precision.margin", f"got {precision.margin}, expected an integer >= 0 (scales back off by 2^margin)")
    _positive(cfg, "precision.block_size", optional=True)
    if precision.get("grad_format") not in (None, *GRAD_FORMATS):
        raise ConfigError("precision.grad_format", f"got {precision.grad_format!r}; valid: {', '.join(GRAD_FORMATS)}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first setting that cannot work; types are checked by the schema."""
    precision = cfg.precision
    if precision.name not in PRECISIONS:
        raise ConfigError("precision.name", f"unknown precision {precision.name!r}; valid: {', '.join(PRECISIONS)}")
    if precision.name == "float8":
        if precision.source_policy not in FP8_SOURCE_POLICIES:
            raise ConfigError("precision.source_policy",
                              f"got {precision.source_policy!r}; valid: {', '.join(FP8_SOURCE_POLICIES)}")
        _positive(cfg, "precision.amax_history_length", optional=True)
        _check_recipe(cfg)
        for key in ("skip", "only"):
            pattern = precision[key]
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError(f"precision.{key}", f"{pattern!r} is not a valid regular expression ({error})")
    else:
        for key in ("source_policy", "amax_history_length", "skip", "only", *RECIPE_KEYS):
            if precision.get(key) is not None:
                raise ConfigError(f"precision.{key}",
                                  f"only applies to precision=float8, not {precision.name}; remove it")

    _positive(cfg, "data.vocabulary_size", "data.sequence_length")
    if cfg.data.vocabulary_size < 3:
        raise ConfigError("data.vocabulary_size", f"got {cfg.data.vocabulary_size}, needs at least 3 (pad, unknown, one token)")
    task = cfg.task.name if cfg.get("task") is not None else "classify"
    if cfg.data.name != "synthetic" and task == "causal_lm" and cfg.data.vocabulary_size < 257:
        raise ConfigError("data.vocabulary_size", f"{cfg.data.vocabulary_size} is too small for the byte-level BPE "
                          "of task=causal_lm: it needs at least 257 (256 bytes and <|endoftext|>)")
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

    _check_model(cfg)

    _positive(cfg, "trainer.epochs", "trainer.batch_size", "trainer.learning_rate", "trainer.steps_per_execution")
    _positive(cfg, "trainer.steps_per_epoch", "trainer.eval_steps", "trainer.eval_every_steps",
              "trainer.checkpoint_every", optional=True)
    if cfg.trainer.stale_after_s < 180:
        raise ConfigError("trainer.stale_after_s", f"got {cfg.trainer.stale_after_s}, expected at least 180 seconds "
                          "(three missed heartbeats): a live run must not look gone")
    if (cfg.trainer.resume or cfg.trainer.resume_from) and cfg.tracking.name == "none":
        key = "trainer.resume_from" if cfg.trainer.resume_from else "trainer.resume"
        raise ConfigError(key, "needs tracking=mlflow: checkpoints live in the MLflow run")

    check_distribution(cfg)

    report = cfg.get("report")
    if report is not None and not 0.0 <= report.parity_threshold < 1.0:
        raise ConfigError("report.parity_threshold", f"got {report.parity_threshold}, expected a fraction in [0, 1), "
                          "e.g. 0.0025 for 0.25% relative loss error")

    if cfg.tracking.name not in TRACKERS:
        raise ConfigError("tracking.name", f"unknown tracker {cfg.tracking.name!r}; valid: {', '.join(TRACKERS)}")
    _positive(cfg, "tracking.fp8_log_every")
    _positive(cfg, "tracking.log_every_steps", optional=True)
    if not 0.0 <= cfg.tracking.fp8_warn_fraction <= 1.0:
        raise ConfigError("tracking.fp8_warn_fraction", f"got {cfg.tracking.fp8_warn_fraction}, expected a value in [0, 1]")
    if not str(cfg.tracking.experiment).strip():
        raise ConfigError("tracking.experiment", "must not be empty")
    if cfg.tracking.name != "none" and cfg.tracking.retry_s < 0:
        raise ConfigError("tracking.retry_s", f"got {cfg.tracking.retry_s}, expected 0 or more seconds")


# Keys only some model families have (null everywhere else).
FAMILY_KEYS = {
    "num_key_value_heads": ("llama", "gemma"),
    "head_dim": ("gemma",),
    "max_sequence_length": (*DECODER_FAMILIES, "bert"),
    "preset": (*DECODER_FAMILIES, "bert"),
}
PRESET_WEIGHTS = ("model.weights.h5", "model.weights.json")
"""A preset's weights: one file, or the index of sharded ones (Backbone.save_to_preset writes either)."""


def _check_model(cfg: DictConfig) -> None:
    model = cfg.model
    family = model.family
    if family not in MODEL_FAMILIES:
        raise ConfigError("model.family", f"unknown family {family!r}; valid: {', '.join(MODEL_FAMILIES)}")
    for key, families in FAMILY_KEYS.items():
        if model.get(key) is not None and family not in families:
            raise ConfigError(f"model.{key}", f"model.family={family} has no {key} (only {', '.join(families)} "
                              f"do); remove it or set it to null")
    task = OmegaConf.select(cfg, "task.name", default=None)
    if task is not None and task not in TASKS:
        raise ConfigError("task.name", f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if task is not None:
        check_task(family, task)
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError("model.dropout", f"got {model.dropout}, expected a value in [0, 1)")
    if family != "classifier":
        _positive(cfg, "model.max_sequence_length")
    if model.get("preset") is not None:
        _check_preset_sizes(cfg, read_preset(model.preset, family))
        return

    _positive(cfg, "model.hidden_dim", "model.num_heads", "model.intermediate_dim", "model.num_layers")
    _positive(cfg, "model.num_key_value_heads", "model.head_dim", optional=True)
    if not (family == "gemma" and model.head_dim is not None) and model.hidden_dim % model.num_heads:
        raise ConfigError("model.hidden_dim",
                          f"{model.hidden_dim} is not divisible by model.num_heads={model.num_heads}; "
                          f"pick a multiple of {model.num_heads} or change model.num_heads")
    kv_heads = model.get("num_key_value_heads")
    if kv_heads is not None and model.num_heads % kv_heads:
        divisors = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
        raise ConfigError("model.num_key_value_heads",
                          f"{kv_heads} does not divide model.num_heads={model.num_heads}; valid: "
                          f"{', '.join(map(str, divisors))}")
    if family in ("llama", "gemma"):
        head_dim = model.head_dim if model.get("head_dim") is not None else model.hidden_dim // model.num_heads
        if head_dim % 2:
            key = "model.head_dim" if model.get("head_dim") is not None else "model.hidden_dim"
            raise ConfigError(key, f"gives attention heads of odd width {head_dim}; {family}'s rotary position "
                              "embedding needs an even head width")
    if family == "gemma" and model.intermediate_dim % 2:
        raise ConfigError("model.intermediate_dim", f"{model.intermediate_dim} is odd; gemma splits it into two "
                          "gated projections of half the width, so it must be even")
    if family != "classifier" and cfg.data.sequence_length > model.max_sequence_length:
        raise ConfigError("data.sequence_length",
                          f"{cfg.data.sequence_length} is longer than model.max_sequence_length="
                          f"{model.max_sequence_length}; use at most {model.max_sequence_length} or raise "
                          "model.max_sequence_length")


def check_task(family: str, task: str) -> None:
    """Which family can do which task: causal language modelling needs a decoder."""
    tasks = FAMILY_TASKS.get(family, ())
    if task not in tasks:
        able = [name for name, can in FAMILY_TASKS.items() if task in can]
        raise ConfigError("model.family", f"{family} cannot do task={task} (it can: {', '.join(tasks)}); "
                          f"families that can: {', '.join(able) or 'none'}")


def read_preset(path: str, family: str | None = None) -> dict:
    """The backbone config (the constructor arguments) of a keras-hub preset directory on disk, after
    checking it is one, complete, and of `family`'s architecture (None: of any family's); its key
    "family" says which. Reads JSON only: nothing heavy loads."""
    if "://" in str(path):
        raise ConfigError("model.preset", f"{path!r} is a remote handle; fp8exp loads presets only from a "
                          "local directory (download it once yourself and give its path)")
    directory = Path(str(path)).expanduser()
    written_by = "a directory Backbone.save_to_preset writes: config.json and model.weights.h5"
    if not directory.is_dir():
        raise ConfigError("model.preset", f"no directory {directory}; give {written_by}")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError("model.preset", f"{directory} has no config.json, so it is not a keras-hub preset; "
                          f"give {written_by}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError("model.preset", f"{config_file} is not readable JSON ({error}); the preset is damaged")
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        hint = (" (a Hugging Face Transformers checkpoint: load it once with keras_hub.models.Backbone."
                "from_preset(path) and save_to_preset a keras-hub copy)") if isinstance(config, dict) and \
            "model_type" in config else ""
        raise ConfigError("model.preset", f"{config_file} is not a keras-hub backbone config{hint}; give {written_by}")
    class_name = str(config.get("registered_name") or config.get("class_name", "?")).rpartition(">")[2]
    owner = next((name for name, cls in BACKBONE_CLASSES.items() if cls == class_name), None)
    if owner is None or (family is not None and owner != family):
        expected = BACKBONE_CLASSES[family] if family is not None else " or a ".join(BACKBONE_CLASSES.values())
        fix = f"use model={owner}_<size> for it" if owner else "fp8exp builds none of that architecture"
        raise ConfigError("model.preset", f"{directory} holds a {class_name}, not a {expected}"
                          f"{f' (model.family={family})' if family else ''}; {fix}, or give "
                          f"{f'a {family}' if family else 'another'} preset")
    if not any((directory / name).is_file() for name in PRESET_WEIGHTS):
        raise ConfigError("model.preset", f"{directory} has config.json but no weights ({' or '.join(PRESET_WEIGHTS)}): "
                          "the preset is incomplete; save it again with Backbone.save_to_preset")
    dtype = config["config"].get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap":
        modes = {entry.get("config", {}).get("mode") for entry in dtype.get("config", {}).get("policy_map", {}).values()}
        if modes - {"float8"}:
            raise ConfigError("model.preset", f"{directory} holds layers quantized to "
                              f"{', '.join(sorted(str(m) for m in modes - {'float8'}))}; fp8exp loads float or "
                              "float8 presets only")
    return {**config["config"], "family": owner}


def _check_preset_sizes(cfg: DictConfig, preset: dict) -> None:
    """What a preset fixes and the data must fit: its position table and its vocabulary."""
    where = f"the preset {cfg.model.preset}"
    limit = preset.get("max_sequence_length", cfg.model.max_sequence_length)
    if cfg.data.sequence_length > limit:
        raise ConfigError("data.sequence_length", f"{cfg.data.sequence_length} is longer than the "
                          f"max_sequence_length={limit} of {where}; use at most {limit}")
    vocabulary = preset.get("vocabulary_size")
    if vocabulary is not None and cfg.data.vocabulary_size > vocabulary:
        raise ConfigError("data.vocabulary_size", f"{cfg.data.vocabulary_size} is more than the vocabulary_size="
                          f"{vocabulary} of {where}; token ids must stay below it: use at most {vocabulary}")
