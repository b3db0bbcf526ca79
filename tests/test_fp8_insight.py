"""FP8 insight on CPU: the GEMM check says `emulated` and counts the right matmuls, the probe's
numbers match hand computation and theory, health warnings fire when they should, and the
layer filters quantize exactly what they say."""

import re

import jax
import jax.numpy as jnp
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
    assert re.search(r" dot\(f32\[\d+,\d+\]\{1,0\} %\S+, f32\[", report.hlo)  # the saved text shows operand types


def test_gemm_verdicts():
    assert fp8_gemm.GemmReport(24, 24, 30, "").verdict == "fused"
    assert fp8_gemm.GemmReport(24, 10, 30, "").verdict == "partial"
    assert fp8_gemm.GemmReport(24, 0, 30, "").verdict == "emulated"


def test_optimized_hlo_of_a_real_compilation_has_typed_operands():
    def matmul(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    compiled = jax.jit(matmul).lower(jnp.ones((16, 32), jnp.float8_e4m3fn), jnp.ones((32, 16), jnp.float8_e5m2)).compile()
    assert re.search(r" dot\(%\S+, %\S+\)", compiled.as_text())  # JAX's own text: untyped operands
    hlo = fp8_gemm.optimized_hlo(compiled)
    # XLA on CPU converts the f8 operands up and multiplies in f32: not an FP8 GEMM.
    assert re.search(r" dot\(f32\[16,32\]\{1,0\} %\S+, f32\[32,16\]\{1,0\} %\S+\)", hlo)
    assert "convert(f8e4m3fn[16,32]{1,0} %" in hlo and "convert(f8e5m2[32,16]{1,0} %" in hlo
    assert fp8_gemm.count_fp8_gemms(hlo) == 0


def _gemm_fusion(name, kind, lhs="f8e4m3fn", rhs="f8e5m2"):
    """A fused computation with its dot and the fusion calling it, as XLA prints them for a GPU with
    operand shapes (a __triton_nested_gemm_fusion also fuses its operands' producers)."""
    body = (f"%{name}_computation (parameter_0: {lhs}[64,128], parameter_1: {rhs}[128,32]) -> bf16[64,32] {{\n"
            f"  %parameter_0 = {lhs}[64,128]{{1,0}} parameter(0)\n"
            f"  %parameter_1 = {rhs}[128,32]{{1,0}} parameter(1)\n"
            f"  ROOT %dot.0 = bf16[64,32]{{1,0}} dot({lhs}[64,128]{{1,0}} %parameter_0, {rhs}[128,32]{{1,0}} "
            "%parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n}\n")
    call = (f"  %{name} = bf16[64,32]{{1,0}} fusion({lhs}[64,128]{{1,0}} %a, {rhs}[128,32]{{1,0}} %b), kind=kCustom, "
            f'calls=%{name}_computation, backend_config={{"operation_queue_id":"0","wait_on_operation_queues":[],'
            f'"fusion_backend_config":{{"kind":"{kind}","triton_gemm_config":{{"block_m":"64","block_n":"32",'
            '"block_k":"128","split_k":"1","num_stages":"4","num_warps":"4","num_ctas":"1"}},'
            '"force_earliest_schedule":false}\n')
    return body, call


NESTED_GEMM_FUSION = """\
%block_lhs (parameter_0.1: f8e4m3fn[64,128]) -> f8e4m3fn[64,128] {
  ROOT %parameter_0.1 = f8e4m3fn[64,128]{1,0} parameter(0)
}

%block_rhs (parameter_0.2: f8e4m3fn[128,32]) -> f8e4m3fn[128,32] {
  ROOT %parameter_0.2 = f8e4m3fn[128,32]{1,0} parameter(0)
}

%gemm_fusion_dot.7_computation (parameter_0: f8e4m3fn[64,128], parameter_1: f8e4m3fn[128,32]) -> f32[64,32] {
  %parameter_0 = f8e4m3fn[64,128]{1,0} parameter(0)
  %block_fusion = f8e4m3fn[64,128]{1,0} fusion(f8e4m3fn[64,128]{1,0} %parameter_0), kind=kCustom, calls=%block_lhs, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"num_warps":"4","output_tiles":[{"sizes":["64","128"]}]}}}
  %parameter_1 = f8e4m3fn[128,32]{1,0} parameter(1)
  %block_fusion.1 = f8e4m3fn[128,32]{1,0} fusion(f8e4m3fn[128,32]{1,0} %parameter_1), kind=kCustom, calls=%block_rhs, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"num_warps":"4","output_tiles":[{"sizes":["128","32"]}]}}}
  ROOT %dot.0 = f32[64,32]{1,0} dot(f8e4m3fn[64,128]{1,0} %block_fusion, f8e4m3fn[128,32]{1,0} %block_fusion.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
NESTED_GEMM_CALL = ('  %gemm_fusion_dot.7 = f32[64,32]{1,0} fusion(f8e4m3fn[64,128]{1,0} %a, f8e4m3fn[128,32]{1,0} %b), '
                    'kind=kCustom, calls=%gemm_fusion_dot.7_computation, backend_config={"operation_queue_id":"0",'
                    '"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":'
                    '{"num_warps":"4","output_tiles":[{"sizes":["64","32"]}]}}}\n')
CUBLAS_F8 = ('  %cublas-gemm.1 = (bf16[64,32]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[64,128]{1,0} %a, '
             'f8e4m3fn[32,128]{1,0} %b, f32[] %sa, f32[] %sb), custom_call_target="__cublas$lt$matmul$f8", '
             'backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"lhs_contracting_dimensions":["1"]}}\n')
CUBLAS_MX = ('  %cublas-gemm.2 = (bf16[64,32]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[64,128]{1,0} %a, '
             'f8e4m3fn[32,128]{1,0} %b, f8e8m0fnu[64,4]{1,0} %sa, f8e8m0fnu[32,4]{1,0} %sb), '
             'custom_call_target="__cublas$lt$matmul$mx", backend_config={"gemm_backend_config":{"scale_mode":2}}\n')
CUBLAS_BF16 = ('  %cublas-gemm.3 = (bf16[64,32]{1,0}, s8[4194304]{0}) custom-call(bf16[64,128]{1,0} %c, '
               'bf16[128,32]{1,0} %d), custom_call_target="__cublas$lt$matmul", backend_config={}\n')


def _gpu_module(computations: str, entry: str) -> str:
    return (f"HloModule jit_train_step, entry_computation_layout={{(f8e4m3fn[64,128]{{1,0}})->bf16[64,32]{{1,0}}}}\n\n"
            f"{computations}\nENTRY %main.9 (a: f8e4m3fn[64,128], b: f8e5m2[128,32]) -> bf16[64,32] {{\n"
            "  %a = f8e4m3fn[64,128]{1,0} parameter(0)\n  %b = f8e5m2[128,32]{1,0} parameter(1)\n"
            f"{entry}  ROOT %tuple = () tuple()\n}}\n")


@pytest.mark.parametrize("kind,dtype,expected", [
    ("__triton_gemm", "f8e4m3fn", 1),
    ("__cudnn$fusion", "f8e4m3fn", 1),
    ("__triton_gemm", "bf16", 0),
])
def test_gemm_fusions_count_once_when_their_dot_is_fp8(kind, dtype, expected):
    body, call = _gemm_fusion("gemm_fusion_dot.3", kind, lhs=dtype, rhs=dtype)
    assert fp8_gemm.count_fp8_gemms(_gpu_module(body, call)) == expected


def test_fused_fp8_gemms_are_recognised_in_gpu_hlo():
    fusions = [_gemm_fusion(f"gemm_fusion_dot.{i}", "__triton_gemm") for i in range(2)]
    bf16 = _gemm_fusion("gemm_fusion_dot.5", "__triton_gemm", lhs="bf16", rhs="bf16")
    loop = _gemm_fusion("loop_fusion", "__ynn_fusion")  # a dot fused by something other than a GEMM emitter
    bodies = "\n".join(body for body, _ in [*fusions, bf16, loop]) + "\n" + NESTED_GEMM_FUSION
    calls = "".join(call for _, call in [*fusions, bf16, loop]) + NESTED_GEMM_CALL + CUBLAS_F8 + CUBLAS_MX + CUBLAS_BF16
    bare = "  %dot.9 = bf16[8,32]{1,0} dot(f8e4m3fn[8,16]{1,0} %c, f8e5m2[16,32]{1,0} %d), lhs_contracting_dims={1}\n"
    hlo = _gpu_module(bodies, calls + bare)
    fused = fp8_gemm.count_fp8_gemms(hlo)
    assert fused == 2 + 1 + 2 + 1  # triton, nested triton, cuBLASLt f8 and mx, a bare f8 dot
    assert fp8_gemm.GemmReport(6, fused, 10, hlo).verdict == "fused"


@pytest.mark.parametrize("target", ["__cublas$lt$matmul$f8", "__cublas$lt$matmul$mx"])
def test_cublaslt_fp8_custom_calls_count(target):
    call = CUBLAS_F8 if target.endswith("f8") else CUBLAS_MX
    assert fp8_gemm.count_fp8_gemms(_gpu_module("", call + CUBLAS_BF16)) == 1


def _qdq(a):
    """Keras' FP8 pattern: quantize to FP8, dequantize to the compute dtype, scale."""
    return a.astype(jnp.float8_e4m3fn).astype(jnp.bfloat16) * 2


def _matmuls(fn, *args):
    return fp8_gemm.count_matmuls(jax.make_jaxpr(jax.jit(fn))(*args).jaxpr)


def test_matmuls_inside_scan_and_while_are_counted_through_the_carry():
    x, ws = jnp.ones((8, 8), jnp.bfloat16), jnp.ones((3, 8, 8), jnp.bfloat16)

    def scanned(x, ws):  # a scanned layer stack; its operands are cast to FP8 outside the loop
        return jax.lax.scan(lambda h, w: (_qdq(h @ w), h), _qdq(x), _qdq(ws))[0] @ x

    assert _matmuls(scanned, x, ws) == {"total": 2, "fp8": 1}

    def looped(x, w, n):  # the condition and the body each close over a value
        w = _qdq(w)
        body = lambda c: (c[0] + 1, _qdq(c[1] @ w))
        return jax.lax.while_loop(lambda c: c[0] < n, body, (0, _qdq(x)))[1] @ x

    assert _matmuls(looped, x, x, jnp.int32(3)) == {"total": 2, "fp8": 1}


def test_matmuls_inside_cond_are_counted_in_every_branch():
    x = jnp.ones((8, 8), jnp.bfloat16)

    def branches(p, x, w):
        return jax.lax.cond(p, lambda a, b: a @ b, lambda a, b: (a * 2) @ b, _qdq(x), _qdq(w)) + x @ w

    assert _matmuls(branches, True, x, x) == {"total": 3, "fp8": 2}

    def selected(p, x, w):  # FP8-fed after the cond only if every branch returns an FP8-fed value
        both = jax.lax.cond(p, lambda a: a, lambda a: a * 2, _qdq(x))
        one = jax.lax.cond(p, lambda a, b: a, lambda a, b: b, _qdq(x), x)
        return both @ _qdq(w), one @ _qdq(w)

    assert _matmuls(selected, True, x, x) == {"total": 2, "fp8": 1}


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
