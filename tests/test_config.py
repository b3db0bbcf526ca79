"""Every shipped combination composes and validates; every bad setting names itself."""

import itertools

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from fp8exp.config import PRECISIONS, ConfigError, tracking_uri, validate
from fp8exp.config.precision import FP8_RECIPES
from fp8exp.config.schema import model_name
from tests.conftest import CONF, compose_config

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
CLASSIFIER_MODELS = ["base", "large", "small", "tiny"]
FAMILY_MODELS = [f"{family}_{size}" for family in ("bert", "gemma", "gpt2", "llama") for size in ("base", "small", "tiny")]


def test_presets_are_the_documented_ones():
    assert MODELS == sorted(CLASSIFIER_MODELS + FAMILY_MODELS)
    shorthands = [f"float8_{recipe}" for recipe in FP8_RECIPES if recipe != "delayed"]
    assert sorted(p.stem for p in (CONF / "precision").glob("*.yaml")) == sorted([*PRECISIONS, *shorthands])


@pytest.mark.parametrize("recipe", [r for r in FP8_RECIPES if r != "delayed"])
def test_float8_recipe_shorthands_are_float8_with_the_recipe(recipe):
    cfg = compose_config(f"precision=float8_{recipe}", "precision.grad_format=e5m2")
    validate(cfg)
    assert (cfg.precision.name, cfg.precision.recipe, cfg.precision.grad_format) == ("float8", recipe, "e5m2")
    assert cfg.precision.source_policy == compose_config("precision=float8").precision.source_policy


@pytest.mark.parametrize("precision,model", itertools.product(PRECISIONS, MODELS))
def test_every_precision_and_model_composes(precision, model):
    cfg = compose_config(f"precision={precision}", f"model={model}")
    validate(cfg)
    assert cfg.precision.name == precision
    assert model_name(cfg.model) == model


@pytest.mark.parametrize("model", CLASSIFIER_MODELS)
def test_hidden_dim_512_alone_is_valid(model):
    cfg = compose_config(f"model={model}", "model.hidden_dim=512")
    validate(cfg)
    assert cfg.model.hidden_dim == 512


def test_reference_defaults():
    cfg = compose_config()
    assert (cfg.model.hidden_dim, cfg.model.num_heads, cfg.model.intermediate_dim,
            cfg.model.num_layers, cfg.model.dropout) == (32, 2, 32, 1, 0.1)
    assert cfg.data.name == "imdb"
    assert (cfg.data.vocabulary_size, cfg.data.sequence_length) == (20000, 200)
    assert (cfg.data.validation_fraction, cfg.data.split_seed) == (0.2, 42)
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (32, 3)


def test_intermediate_dim_follows_hidden_dim_in_tiny():
    assert compose_config("model.hidden_dim=64").model.intermediate_dim == 64
    assert compose_config("model.hidden_dim=64", "model.intermediate_dim=16").model.intermediate_dim == 16


def test_float8_exposes_amax_history_length():
    cfg = compose_config("precision=float8", "precision.amax_history_length=16")
    validate(cfg)
    assert cfg.precision.amax_history_length == 16
    assert cfg.precision.source_policy == "mixed_bfloat16"


def test_default_store_is_sqlite_in_launch_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(compose_config()) == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize("overrides,key,words", [
    (["model.hidden_dim=30", "model.num_heads=4"], "model.hidden_dim", "not divisible by model.num_heads=4"),
    (["trainer.epochs=0"], "trainer.epochs", "positive"),
    (["trainer.batch_size=-1"], "trainer.batch_size", "positive"),
    (["data.sequence_length=0"], "data.sequence_length", "positive"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["model.dropout=-0.1"], "model.dropout", "[0, 1)"),
    (["precision.name=fp4"], "precision.name", "float32, mixed_bfloat16, mixed_float16, float8"),
    (["precision=float8", "precision.source_policy=int8"], "precision.source_policy", "mixed_bfloat16"),
    (["precision.amax_history_length=16"], "precision.amax_history_length", "only applies to precision=float8"),
    (["trainer.steps_per_epoch=0"], "trainer.steps_per_epoch", "positive integer or null"),
    (["tracking.name=wandb"], "tracking.name", "mlflow, none"),
    (["data=table"], "data.path", "required for data=table"),
    (["data=text_dir"], "data.path", "required for data=text_dir"),
    (["data.validation_fraction=1.5"], "data.validation_fraction", "(0, 1)"),
    (["data=table", "data.path=x.csv", "data.validation_fraction=0.5", "data.test_fraction=0.5"],
     "data.test_fraction", "sum below 1"),
])
def test_bad_settings_name_the_key_and_what_is_valid(overrides, key, words):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides))
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}: ")
    assert words in str(error.value)


def test_type_errors_come_from_the_schema():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("trainer.epochs=three")
    assert isinstance(error.value.__cause__, ValidationError)
    assert "trainer.epochs" in str(error.value.__cause__)


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigCompositionException):
        compose_config("model.hiden_dim=64")


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(Exception) as error:
        compose_config("precision=fp16")
    assert "mixed_float16" in str(error.value) and "float8" in str(error.value)
