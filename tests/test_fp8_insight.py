"""FP8 insight on CPU: the GEMM check says `emulated` and counts the right matmuls, the probe's
numbers match hand computation and theory, health warnings fire when they should, and the
layer filters quantize exactly what they say."""


import ml_dtypes
import numpy as np
import pytest

from fp8exp.config import ConfigError, validate
from fp8exp.precision import gemm as fp8_gemm
from fp8exp.precision import health as fp8_health
from fp8exp.precision import policy as precision
from fp8exp.precision import probe as fp8_probe
from fp8exp.precision import scales as fp8
from tests.conftest import compose_config
from tests.test_precision import EXPECTED_TINY_FP8_LAYERS, built

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def trained(*overrides):
    cfg, net = built("precision=float8", *overrides)
    net.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 100, (16, 16)).astype("int32"), rng.integers(0, 2, 16).astype("int32")
    net.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return net, x[:8], y[:8]


@pytest.fixture(scope="module")
def trained_fp8():
    return trained()


@pytest.mark.parametrize("overrides,layers", [((), 8), (("precision.skip=head",), 7)])
def test_gemm_check_on_cpu_is_emulated_with_three_matmuls_per_quantized_layer(overrides, layers, trained_fp8):
    net, x, y = trained(*overrides) if overrides else trained_fp8
    report = fp8_gemm.inspect_train_step(net, x, y)
    assert report.verdict == "emulated"
    assert report.fp8_matmuls == 3 * layers  # forward, input gradient, kernel gradient
    assert report.fused == 0
    assert report.total_matmuls == 3 * 8 + 6  # plus attention's QK^T and AV, forward and backward
    assert "f8e4m3fn" in report.hlo and "f8e5m2" in report.hlo


def test_gemm_verdicts():
    assert fp8_gemm.GemmReport(24, 24, 30, "").verdict == "fused"
    assert fp8_gemm.GemmReport(24, 10, 30, "").verdict == "partial"
    assert fp8_gemm.GemmReport(24, 0, 30, "").verdict == "emulated"


def test_fused_gemms_are_recognised_in_gpu_hlo():
    hlo = ('%cublas-gemm.1 = (bf16[8,32]{1,0}, s8[0]{0}) custom-call(f8e4m3fn[8,16]{1,0} %a, '
           'f8e4m3fn[32,16]{1,0} %b), custom_call_target="__cublas$lt$matmul$f8"\n'
           '%dot.2 = bf16[8,32]{1,0} dot(f8e4m3fn[8,16]{1,0} %c, f8e5m2[16,32]{1,0} %d)\n'
           '%dot.3 = bf16[8,32]{1,0} dot(bf16[8,16]{1,0} %e, bf16[16,32]{1,0} %f)\n')
    assert len(fp8_gemm.FP8_GEMM_TARGET.findall(hlo)) + len(fp8_gemm.FP8_DOT.findall(hlo)) == 2


def test_saturation_and_underflow_by_hand():
    # With scale 1: 1000 > 448 saturates; 1e-6 is far below E4M3's smallest subnormal 2^-9.
    stats = fp8_probe.quantization_stats(np.array([1000.0, 1.0, 1e-6, 0.0]), 1.0, E4M3)
    assert stats["saturation"] == 0.25 and stats["underflow"] == 0.25
    # Scale 4 brings 1000 within range (250), and pushes 1e-3 below it too.
    stats = fp8_probe.quantization_stats(np.array([1000.0, 1.0, 1e-3, 0.0]), 4.0, E4M3)
    assert stats["saturation"] == 0.0 and stats["underflow"] == 0.25


@pytest.mark.parametrize("fmt,expected_db", [(E4M3, 31.6), (E5M2, 25.6)])
def test_sqnr_of_amax_scaled_normal_data_matches_theory(fmt, expected_db):
    x = np.random.default_rng(0).standard_normal(1_000_000)
    scale = np.abs(x).max() / float(ml_dtypes.finfo(fmt).max)
    assert fp8_probe.quantization_stats(x, scale, fmt)["sqnr_db"] == pytest.approx(expected_db, abs=0.3)


def test_probe_measures_a_layer_with_known_kernel_and_scale():
    _, net = built("precision=float8")
    head = net.get_layer("head")
    kernel = np.zeros(head.kernel.shape, np.float32)
    kernel[:4, 0] = [1000.0, -900.0, 1e-6, 0.5]  # two saturate, one flushes to zero at scale 1
    head._kernel.assign(kernel)
    probe = fp8_probe.Probe(net, np.ones((2, 16), np.int32))
    metrics = probe.metrics()
    nonzero = np.count_nonzero(kernel)
    assert metrics["fp8/head/kernel_saturation"] == pytest.approx(2 / kernel.size)
    assert metrics["fp8/head/kernel_underflow"] == pytest.approx(1 / kernel.size)
    assert nonzero == 4
    assert set(probe.captures) == EXPECTED_TINY_FP8_LAYERS
    assert probe.captures["head"].inputs.shape == (2, 32)


def test_probe_measures_output_gradients_given_labels(trained_fp8):
    net, x, y = trained_fp8
    probe = fp8_probe.Probe(net, x, y)
    metrics = probe.metrics()
    for layer in EXPECTED_TINY_FP8_LAYERS:
        assert f"fp8/{layer}/outputs_grad_sqnr_db" in metrics
    assert probe.output_grads["head"].shape == (8, 1)
    assert np.any(probe.output_grads["head"])  # a real backward pass reached the head
    assert not any("outputs_grad" in k for k in fp8_probe.Probe(net, x).metrics())


def test_health_is_silent_on_a_trained_model_and_fires_on_broken_ones(trained_fp8):
    net, x, _ = trained_fp8
    probe = fp8_probe.Probe(net, x)
    assert fp8_health.check_health(net, probe.metrics(), threshold=0.5).findings == {}

    fresh = built("precision=float8")[1]  # never trained: scales at 1.0, histories empty
    findings = fp8_health.check_health(fresh, {}, threshold=0.5).findings
    assert len(findings["scale_never_moved"]) == len(findings["amax_zero"]) == 3 * 8

    [entry, *_] = fp8.scale_variables(fresh)
    entry.scale.assign(float("nan"))
    probed = {"fp8/head/inputs_saturation": 0.2, "fp8/dense/kernel_saturation": 0.5}
    sizes = {"head/inputs": 64, "dense/kernel": 2}  # 1 of 2 elements: the one clipped maximum
    findings = fp8_health.check_health(fresh, probed, threshold=0.1, sizes=sizes).findings
    assert findings["non_finite"] == [f"{entry.layer}/{entry.tensor}"]
    assert findings["saturation"] == ["head/inputs"]
    tags = fp8_health.Health(findings).tags()
    assert tags["fp8.health"] == "warn" and tags["fp8.health.saturation"] == "head/inputs"


def test_layer_table_shows_what_fp8_covers(trained_fp8):
    net, x, _ = trained_fp8
    probe = fp8_probe.Probe(net, x)
    probe.metrics()
    table = fp8_health.layer_table(net, probe.captures)
    assert "| token_and_position_embedding/token_embedding | ReversibleEmbedding | mixed_bfloat16 | 3,200 |" in table
    assert "| head | Dense | float8_from_mixed_bfloat16 | 33 |" in table
    assert "FP8 covers 8 layers" in table


@pytest.mark.parametrize("overrides,expected", [
    (("precision.skip=head",), EXPECTED_TINY_FP8_LAYERS - {"head"}),
    (("precision.only=self_attention",), {p for p in EXPECTED_TINY_FP8_LAYERS if "self_attention" in p}),
    (("precision.only=transformer_decoder", "precision.skip=feedforward"),
     {p for p in EXPECTED_TINY_FP8_LAYERS if "self_attention" in p}),
])
def test_filters_quantize_exactly_what_they_say(overrides, expected):
    _, net = built("precision=float8", *overrides)
    assert {entry.layer for entry in fp8.scale_variables(net)} == expected
    policies = {layer.path: layer.dtype_policy.name for layer in precision.quantizable_layers(net)}
    assert {p for p, name in policies.items() if name.startswith("float8")} == expected
    assert {name for p, name in policies.items() if p not in expected} <= {"mixed_bfloat16"}


@pytest.mark.parametrize("overrides,key,words", [
    (("precision.only=embedding",), "precision.only", "only layers Keras cannot quantize"),
    (("precision.skip=nothing_like_this",), "precision.skip", "matches no layer; quantizable layers: "),
    (("precision.skip=.",), "precision.skip", "skips every quantizable layer"),
])
def test_filter_mistakes_name_the_pattern_and_the_candidates(overrides, key, words):
    with pytest.raises(ConfigError) as error:
        built("precision=float8", *overrides)
    assert error.value.key == key and words in str(error.value)
    if "quantizable layers" in words:
        assert "transformer_decoder/self_attention/query" in str(error.value)


@pytest.mark.parametrize("override", ["precision.skip=head", "precision.only=dense"])
def test_fp8_options_without_fp8_are_errors(override):
    with pytest.raises(ConfigError, match="only applies to precision=float8"):
        validate(compose_config("precision=mixed_bfloat16", override))


def test_invalid_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        validate(compose_config("precision=float8", "precision.skip='(unclosed'"))
