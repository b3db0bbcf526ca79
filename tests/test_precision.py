"""The dtype policy really changes the model: FP8 quantizes exactly the Dense/EinsumDense
layers, with the requested amax history; other precisions carry no FP8 state."""

import keras
import pytest

from fp8exp.models import classifier as model
from fp8exp.precision import policy as precision
from fp8exp.precision import scales as fp8
from tests.conftest import compose_config


def built(*overrides):
    cfg = compose_config("data.sequence_length=16", "data.vocabulary_size=100", *overrides)
    net = precision.build(cfg.precision, lambda: model.build_classifier(
        cfg.model, cfg.data.vocabulary_size, cfg.data.sequence_length, 2))
    return cfg, net


EXPECTED_TINY_FP8_LAYERS = {
    "transformer_decoder/self_attention/query", "transformer_decoder/self_attention/key",
    "transformer_decoder/self_attention/value", "transformer_decoder/self_attention/attention_output",
    "transformer_decoder/feedforward_intermediate_dense", "transformer_decoder/feedforward_output_dense",
    "dense", "head",
}


def test_float8_quantizes_every_dense_and_einsum_dense_layer():
    _, net = built("precision=float8")
    quantized = {layer.path: layer.dtype_policy.name for layer in precision.quantizable_layers(net)}
    assert set(quantized) == EXPECTED_TINY_FP8_LAYERS
    assert set(quantized.values()) == {"float8_from_mixed_bfloat16"}
    assert {entry.layer for entry in fp8.scale_variables(net)} == EXPECTED_TINY_FP8_LAYERS
    assert len(fp8.scale_variables(net)) == 3 * len(EXPECTED_TINY_FP8_LAYERS)


def test_embeddings_stay_high_precision_under_float8():
    _, net = built("precision=float8")
    embedding = net.get_layer("token_and_position_embedding")
    assert embedding.dtype_policy.name == "mixed_bfloat16"


def test_amax_history_length_reaches_every_layer():
    _, net = built("precision=float8", "precision.amax_history_length=16")
    shapes = {tuple(entry.amax_history.shape) for entry in fp8.scale_variables(net)}
    assert shapes == {(16,)}


def test_float8_layers_train_under_the_source_policy():
    _, net = built("precision=float8", "precision.source_policy=float32")
    assert {l.dtype_policy.name for l in precision.quantizable_layers(net)} == {"float8_from_float32"}


@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_other_precisions_have_no_fp8_state(name):
    _, net = built(f"precision={name}")
    assert fp8.scale_variables(net) == []
    assert {l.dtype_policy.name for l in precision.quantizable_layers(net)} == {name}


def test_build_leaves_the_global_policy_alone():
    before = keras.config.dtype_policy().name
    built("precision=mixed_float16")
    assert keras.config.dtype_policy().name == before


@pytest.mark.parametrize("name,scaled", [("mixed_float16", True), ("mixed_bfloat16", False), ("float32", False)])
def test_float16_gets_loss_scaling(name, scaled):
    cfg = compose_config(f"precision={name}")
    optimizer = precision.optimizer(cfg.precision, 1e-3)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) is scaled
