"""Several devices, one process: data- and model-parallel training on four virtual CPU
devices gives the single-device result, FP8 included; settings that cannot work say so."""

import json
import os
import subprocess
import sys

import pytest

from fp8exp.config import ConfigError, validate
from tests.conftest import ROOT, compose_config


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice") / "results.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "tests.multidevice", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_data_parallel_matches_one_device(four_devices):
    assert four_devices["devices"] == 4
    single, parallel = four_devices["single"], four_devices["data_parallel"]
    assert parallel["test/loss"] == pytest.approx(single["test/loss"], rel=1e-3)
    assert parallel["test/accuracy"] == pytest.approx(single["test/accuracy"], abs=0.02)


@pytest.mark.slow
def test_model_parallel_matches_one_device(four_devices):
    single, sharded = four_devices["single"], four_devices["model_parallel"]
    assert sharded["test/loss"] == pytest.approx(single["test/loss"], rel=1e-3)


@pytest.mark.slow
def test_float8_trains_data_parallel_and_counts_its_gemms(four_devices):
    run = four_devices["float8_data_parallel"]
    assert run["test/accuracy"] > 0.6
    assert run["fp8_matmuls"] == 24


@pytest.mark.slow
def test_uneven_batch_is_a_clear_error(four_devices):
    assert four_devices["uneven_batch_error"] == ("trainer.batch_size: 30 does not split evenly over the 4 "
                                                  "devices of the batch axis; use a multiple of 4")


@pytest.mark.slow
def test_a_model_axis_that_does_not_divide_the_heads_is_a_clear_error_before_data_loads(four_devices):
    # tests/multidevice.py makes loading the data fail: the check comes first.
    assert four_devices["indivisible_error"] == (
        "distribution.mesh_shape: the model axis has 4 devices, but model.num_heads=2 does not divide by 4; "
        "use a model axis of 1 or 2 (distribution.mesh_shape=[batch, model]) or a model.num_heads that 4 divides")


@pytest.mark.parametrize("overrides,key", [
    (["distribution=data_parallel", "distribution.mesh_shape=[2,2]"], "distribution.mesh_shape"),
    (["distribution=model_parallel", "distribution.mesh_shape=[2]"], "distribution.mesh_shape"),
    (["distribution=model_parallel", "distribution.devices=0"], "distribution.devices"),
])
def test_distribution_settings_are_validated(overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides))
    assert error.value.key == key
