"""FP8 recipes in runs: bad settings stop in one line, a block size that does not divide a layer
warns naming it, recipe runs go end to end through run_experiment (scale statistics, probe,
health, GEMM verdict, layer table, what-if tables and heat map), the recipe layers' state
survives a checkpoint exactly, and the what-if numbers match an independent NumPy computation."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import keras
import ml_dtypes
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fp8exp.config import ConfigError, validate
from fp8exp.config import precision as checks
from fp8exp.models import classifier
from fp8exp.precision import gemm, health, policy, scales, whatif
from fp8exp.precision.probe import Capture
from fp8exp.precision.recipes import recipe as recipes
from fp8exp.run import checkpoint, stopping
from fp8exp.run.experiment import run_experiment
from tests.conftest import compose_config, tracked
from tests.test_precision import EXPECTED_TINY_FP8_LAYERS

TRAINING = ", ".join(("delayed", *recipes.TRAINABLE))
TENSORS = ("inputs", "kernel", "outputs_grad")
BLOCK_STATS = ("scale_min", "scale_max", "scale_median", "at_bound", "zero_blocks", "amax")

# ---------------------------------------------------------------- settings


def test_the_config_lists_are_the_recipes():
    assert tuple(checks.FP8_RECIPES) == ("delayed", *recipes.TRAINABLE)
    assert {name: checks.FP8_RECIPES[name] for name in recipes.TRAINABLE} == \
        {name: recipes.OPTIONS[name] for name in recipes.TRAINABLE}
    assert set(checks.WHATIF_ONLY_RECIPES) == set(recipes.RECIPES) - set(recipes.TRAINABLE)
    assert checks.GRAD_FORMATS == recipes.GRAD_FORMATS
    assert set(policy.RECIPE_OPTIONS) == {key for name in recipes.TRAINABLE for key in recipes.OPTIONS[name]}
    assert set(checks.RECIPE_KEYS) == {"recipe", *policy.RECIPE_OPTIONS}
    assert whatif.RECIPES == ("delayed", *recipes.TRAINABLE, "nvfp4")


@pytest.mark.parametrize("overrides,message", [
    (["precision.recipe=tensorwise"],
     f"precision.recipe: 'tensorwise' is not an FP8 recipe; valid: {TRAINING}"),
    (["precision.recipe=nvfp4"],
     f"precision.recipe: 'nvfp4' is for what-if numerics only (tracking.fp8_whatif), not training; valid: {TRAINING}"),
    (["precision.recipe=mxfp8", "precision.margin=1"],
     "precision.margin: precision.recipe=mxfp8 does not take margin; its options: block_size, grad_format"),
    (["precision.recipe=current", "precision.block_size=64"],
     ("precision.block_size: precision.recipe=current does not take block_size; its options: margin, "
      "power_of_2_scales, grad_format")),
    (["precision.grad_format=e4m3"],
     "precision.grad_format: precision.recipe=delayed does not take grad_format; its options: amax_history_length"),
    (["precision.recipe=block", "precision.amax_history_length=16"],
     ("precision.amax_history_length: only applies to precision.recipe=delayed (Keras' amax history), not block, "
      "which scales from the current tensor; remove it")),
    (["precision.recipe=current", "precision.grad_format=e3m4"], "precision.grad_format: got 'e3m4'; valid: e4m3, e5m2"),
    (["precision.recipe=block", "precision.margin=-1"],
     "precision.margin: got -1, expected an integer >= 0 (scales back off by 2^margin)"),
    (["precision.recipe=mxfp8", "precision.block_size=0"],
     "precision.block_size: got 0, expected a positive integer or null"),
])
def test_bad_recipe_settings_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config("precision=float8", *overrides))
    assert str(error.value) == message


@pytest.mark.parametrize("precision,key", [("mixed_bfloat16", "recipe"), ("float32", "block_size"),
                                           ("mixed_float16", "grad_format")])
def test_recipe_keys_need_float8(precision, key):
    value = {"recipe": "block", "block_size": "64", "grad_format": "e4m3"}[key]
    with pytest.raises(ConfigError) as error:
        validate(compose_config(f"precision={precision}", f"precision.{key}={value}"))
    assert str(error.value) == f"precision.{key}: only applies to precision=float8, not {precision}; remove it"


def test_every_recipe_and_its_options_validate():
    for name in recipes.TRAINABLE:
        validate(compose_config("precision=float8", f"precision.recipe={name}", "precision.grad_format=e5m2"))
    validate(compose_config("precision=float8", "precision.recipe=block", "precision.block_size=64",
                            "precision.margin=1", "precision.power_of_2_scales=false"))
    assert compose_config("precision=float8").precision.recipe == "delayed"


def built(*overrides):
    cfg = compose_config("data.sequence_length=16", "data.vocabulary_size=100", "precision=float8", *overrides)
    validate(cfg)
    return cfg, policy.build(cfg.precision, lambda: classifier.build_classifier(cfg.model, 100, 16, 2))


def test_a_block_size_that_does_not_divide_a_layer_warns_naming_it(caplog):
    with caplog.at_level(logging.WARNING, logger="fp8exp.precision.policy"):
        cfg, net = built("precision.recipe=mxfp8")  # hidden 32: only the head's single output is short
    [line] = [record.getMessage() for record in caplog.records]
    assert line == ("FP8 recipe mxfp8: block_size 32 does not divide these layers' dims, so their operands are "
                    "padded with zeros to whole blocks (exact; costs the padding): head (output dim 1 is not a "
                    "multiple of block_size 32: padded with zeros to 32)")
    applied = policy.applied_recipe(net, cfg.precision)
    assert set(applied.layers) == EXPECTED_TINY_FP8_LAYERS and list(applied.padded) == ["head"]
    assert not applied.high_precision


def test_recipe_state_is_fp8_bookkeeping_and_its_faults_are_named():
    counts = {}
    for recipe in ("delayed", "block"):
        _, net = built(f"precision.recipe={recipe}")
        counts[recipe] = net.count_params() - scales.state_size(net)
    assert counts["delayed"] == counts["block"]
    assert set(scales.fp8_layer_paths(net)) == EXPECTED_TINY_FP8_LAYERS and scales.scale_variables(net) == []
    findings = health.check_health(net, {}, threshold=0.01).findings  # never trained: records still zero
    assert len(findings["scale_never_moved"]) == 3 * 8
    record = np.zeros((3, 6), np.float32)
    record[0] = [0.5, 1.0, 0.75, 0.5, 0.0, 1.0]  # inputs: half the blocks at their bound
    record[2, 5] = np.nan
    net.get_layer("head").scale_stats.assign(record)
    findings = health.check_health(net, {}, threshold=0.01).findings
    assert findings["at_bound"] == ["head/inputs"] and findings["non_finite"] == ["head/outputs_grad"]
    assert stopping.non_finite_fp8(net) == ["head/outputs_grad_scale_stats"]


@pytest.mark.parametrize("recipe,dequantized", [("current", 0), ("rowwise_gw_hp", 0), ("block", 24), ("mxfp8", 24)])
def test_block_scaled_recipes_are_emulated_by_construction(recipe, dequantized):
    _, net = built(f"precision.recipe={recipe}")
    assert gemm.dequantized_matmuls(net) == dequantized
    report = gemm.GemmReport(24, 24, 30, "", gemm.dequantized_matmuls(net))
    assert report.verdict == ("emulated" if dequantized else "fused")


def test_recipe_layers_state_round_trips_through_a_checkpoint():
    """Every variable of a recipe model and its optimizer, the scale records included, comes back bit
    for bit (the exact-resume machinery of run/checkpoint.py; tests/test_reliability.py runs it end
    to end). Random values stand in for a trained state."""
    rng = np.random.default_rng(0)

    def model():
        net = built("precision.recipe=block")[1]
        net.compile(optimizer="adam", loss="binary_crossentropy")
        net.optimizer.build(net.trainable_variables)
        return net

    first, second = model(), model()
    for variable in first.variables + first.optimizer.variables:
        if "float" in str(variable.dtype):
            variable.assign(rng.standard_normal(variable.shape).astype(variable.dtype))
    state = checkpoint.capture(first, 1, 2, "hash")
    assert len([path for path in state.meta["paths"]["trainable"] if path.endswith("/scale_stats")]) == 8
    checkpoint.restore_untrained(second, state)
    pairs = list(zip(first.variables + first.optimizer.variables, second.variables + second.optimizer.variables))
    assert len(pairs) == len(second.variables) + len(second.optimizer.variables)
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=a.path)
    assert np.any(second.get_layer("head").scale_stats.numpy())


# ---------------------------------------------------------------- what-if against NumPy


def ref_stats(x, q, decode, fmax):
    x, q = x.astype(np.float64), q.astype(np.float64)
    noise = np.sum((x - q) ** 2)
    beyond = np.abs(x) / decode.astype(np.float64) > fmax * (1 + 1e-6)  # clipped, beyond float32 rounding
    return (float(np.mean(beyond)), float(np.mean((x != 0) & (q == 0))),
            10 * math.log10(np.sum(x ** 2) / noise))


def ref_current(x):
    """TE current scaling, E4M3: s = 448 / amax (float32), q = RNE(clip(x * s)) / s."""
    s = np.float32(448.0) / np.float32(np.max(np.abs(x)))
    q = np.clip(x * s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * (np.float32(1) / s)
    return ref_stats(x, q, np.full(x.shape, np.float32(1) / s), 448.0)


def ref_mxfp8(x, axis):
    """OCP MX: per 32 elements along `axis`, X = 2^(floor(log2 amax) - 8), q = RNE(clip(x / X)) * X."""
    xt = x if axis == 1 else x.T
    q, decode = np.zeros_like(xt), np.zeros_like(xt)
    for r in range(xt.shape[0]):
        for c in range(0, xt.shape[1], 32):
            block = xt[r, c:c + 32]
            amax = np.max(np.abs(block))
            scale = np.float32(2.0 ** (math.floor(math.log2(amax)) - 8)) if amax > 0 else np.float32(1)
            q[r, c:c + 32] = np.clip(block / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
            decode[r, c:c + 32] = scale
    return ref_stats(xt, q, decode, 448.0)


def test_whatif_numbers_match_an_independent_numpy_computation():
    rng = np.random.default_rng(4)
    inputs = keras.Input((96,))
    net = keras.Model(inputs, keras.layers.Dense(64, name="d")(inputs))
    x = rng.standard_normal((48, 96)).astype(np.float32)
    x[3] *= 1e-6   # a quiet row: flushes to zero under one per-tensor scale
    x[7, 5] = 80.0  # an outlier
    kernel = (rng.standard_normal((96, 64)) * 2.0 ** rng.integers(-14, 4, 64)).astype(np.float32)
    net.get_layer("d").kernel.assign(kernel)  # output channels of very different sizes
    measure = whatif.WhatIf(None)
    table = measure.table(net, {"d": Capture(x, (48, 64))}, {})
    assert set(table["d"]) == {"inputs", "kernel"}  # no labels, no output gradient
    got = dict(zip(whatif.RECIPES, table["d"]["inputs"].tolist()))
    for name, expected in (("current", ref_current(x)), ("delayed", ref_current(x)), ("mxfp8", ref_mxfp8(x, 1))):
        assert got[name] == pytest.approx(expected, rel=1e-4, abs=1e-9), name
    assert got["current"][1] > 0.01 and got["mxfp8"][1] == 0  # per-tensor flushes the quiet row, MX blocks do not
    assert got["mxfp8"][0] > 0  # E8M0 rounds the scale down: significands above 1.75 clip (OCP MX)
    kernel_mx = dict(zip(whatif.RECIPES, table["d"]["kernel"].tolist()))["mxfp8"]
    assert kernel_mx == pytest.approx(ref_mxfp8(kernel, 0), rel=1e-4, abs=1e-9)  # blocks run down the kernel's K
    assert kernel_mx[2] > ref_mxfp8(kernel, 1)[2] + 3  # not across its output channels
    rows = measure.measure(net, SimpleNamespace(captures={"d": Capture(x, (48, 64))}, output_grads={}), 3)
    parsed = list(csv.DictReader(whatif.to_csv(rows, 3).splitlines()))
    assert [(r["tensor"], r["recipe"]) for r in parsed] == [(t, n) for t in ("inputs", "kernel") for n in whatif.RECIPES]
    assert float(parsed[1]["sqnr_db"]) == pytest.approx(got["current"][2], rel=1e-5) and parsed[0]["step"] == "3"


# ---------------------------------------------------------------- end to end

RUN_RECIPES = ("block", "rowwise")


@pytest.fixture(scope="module")
def recipe_runs(store):
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    outcomes = {}
    for name in RUN_RECIPES:
        cfg = tracked(store, "precision=float8", f"precision.recipe={name}", "tracking.fp8_log_every=8",
                      "tracking.experiment=recipes")
        validate(cfg)
        outcomes[name] = run_experiment(cfg)
    return client, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RUN_RECIPES)
def test_a_recipe_run_trains_and_logs_its_fp8_state(recipe_runs, recipe, tmp_path):
    client, outcomes = recipe_runs
    run = client.get_run(outcomes[recipe].run_id)
    run_id, metrics, tags = run.info.run_id, run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    losses = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert losses[-1] < losses[0] and metrics["test/accuracy"] > 0.7, (losses, metrics["test/accuracy"])
    assert tags["fp8.recipe"] == recipe and tags["fp8.gemm"] == "emulated"
    assert metrics["fp8/gemm/dequantized"] == (24 if recipe == "block" else 0)
    assert ("fp8.recipe.padded" in tags) == (recipe == "block")  # hidden 32 < 128-element blocks
    assert tags["fp8.health"] in ("ok", "warn")
    for layer in EXPECTED_TINY_FP8_LAYERS:
        for tensor in TENSORS:
            for stat in BLOCK_STATS:
                assert f"fp8/{layer}/{tensor}_{stat}" in metrics, (layer, tensor, stat)
            assert f"fp8/{layer}/{tensor}_sqnr_db" in metrics  # the probe, under the layer's own recipe
    # A recipe's scales are the step's own: logged at the log point itself (every 8 of 32 steps).
    assert [m.step for m in client.get_metric_history(run_id, "fp8/head/kernel_scale_median")] == [8, 16, 24, 32]
    assert metrics["fp8/head/kernel_scale_median"] > 0 and metrics["perf/fp8_whatif_s"] > 0

    assert {a.path for a in client.list_artifacts(run_id, "fp8")} == {
        "fp8/layers.md", "fp8/train_step_hlo.txt", "fp8/recipe.txt", "fp8/whatif"}
    listed = {a.path for a in client.list_artifacts(run_id, "fp8/whatif")}
    assert listed == {f"fp8/whatif/step_{s}.csv" for s in (8, 16, 24, 32)} | {"fp8/whatif/summary.csv",
                                                                            "fp8/whatif/sqnr.png"}
    expected = {(layer, tensor, name) for layer in EXPECTED_TINY_FP8_LAYERS for tensor in TENSORS for name in whatif.RECIPES}
    for name in ("step_8.csv", "summary.csv"):
        path = Path(client.download_artifacts(run_id, f"fp8/whatif/{name}", str(tmp_path)))
        rows = list(csv.DictReader(path.read_text().splitlines()))
        assert {(r["layer"], r["tensor"], r["recipe"]) for r in rows} == expected and len(rows) == len(expected)
        assert all(0 <= float(r["saturation"]) <= 1 and float(r["sqnr_db"]) > 10 for r in rows if r["recipe"] != "nvfp4")
    assert {r["step"] for r in rows} == {"32"}  # the summary is the last probe point
    png = Path(client.download_artifacts(run_id, "fp8/whatif/sqnr.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = Path(client.download_artifacts(run_id, "fp8/layers.md", str(tmp_path))).read_text()
    assert f"| head | RecipeDense | float8_{recipe}_from_mixed_bfloat16 | 33 |" in table
    assert "| transformer_decoder/self_attention/query | RecipeEinsumDense |" in table and "FP8 covers 8 layers" in table
    [model] = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    assert model.tags["fp8exp.recipe_layers"] == "8"  # saved as other runs are (tests/test_recipes_serve.py serves them)
