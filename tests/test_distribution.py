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
    (["distribution=fsdp", "distribution.mesh_shape=[2,2]"], "distribution.mesh_shape"),
    (["distribution=data_parallel", "distribution.num_processes=2"], "distribution.coordinator"),
    (["distribution=data_parallel", "distribution.coordinator=127.0.0.1", "distribution.num_processes=2",
      "distribution.process_id=0"], "distribution.coordinator"),
    (["distribution=data_parallel", "distribution.coordinator=h:1", "distribution.num_processes=2",
      "distribution.process_id=-1"], "distribution.process_id"),
    (["distribution.coordinator=h:1", "distribution.num_processes=2", "distribution.process_id=1"],
     "distribution.name"),
    (["distribution=data_parallel", "distribution.coordinator=h:1", "distribution.num_processes=2",
      "distribution.process_id=1", "distribution.devices=2"], "distribution.devices"),
])
def test_distribution_settings_are_validated(overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides))
    assert error.value.key == key


SHARDING_SCRIPT = """
import json, sys
import fp8exp
import keras
from fp8exp import data
from fp8exp.config import validate
from fp8exp.precision import policy
from fp8exp.run import distribution, tasks
from fp8exp.run.experiment import run_experiment
from tests.conftest import FAST, compose_config

same = [*FAST, "trainer.epochs=1", "model.dropout=0", "precision=float8", "tracking.log_every_steps=1",
        "tracking.fp8_probe=false", "tracking.fp8_whatif=false", "tracking.save_model=false",
        "tracking.system_metrics=false", "tracking.fp8_gemm_check=false",
        f"tracking.uri=sqlite:///{sys.argv[1]}/mlflow.db", f"tracking.artifact_root={sys.argv[1]}/artifacts"]


def layouts(*overrides, table=False):
    # each variable's PartitionSpec; with table, fp8/layers.md's table of the model instead
    cfg = compose_config(*same, *overrides)
    validate(cfg)
    with distribution.scope(distribution.make(cfg.distribution, cfg.model)):
        splits = data.load(cfg.data, tasks.task_name(cfg))
        net = policy.build(cfg.precision, lambda: tasks.build_model(cfg, splits))
        net.compile(optimizer=keras.optimizers.Adam())
        net.optimizer.build(net.trainable_variables)
        if table:
            from fp8exp.precision.health import layer_table
            return layer_table(net, {})
        return {v.path: str(v.value.sharding.spec) for v in [*net.weights, *net.optimizer.variables]}


ids = {}
for name in ("data_parallel", "fsdp"):
    cfg = compose_config(*same, f"distribution={name}", f"tracking.experiment={name}")
    validate(cfg)
    ids[name] = run_experiment(cfg).run_id
llama = ["model=llama_tiny", "task=causal_lm", "trainer.steps_per_epoch=4", "tracking=none"]
losses = {name: run_experiment(compose_config(*same, *llama, *extra)).metrics["test/loss"]
          for name, extra in {"one_device": [], "sharded": ["distribution=model_parallel",
                                                          "distribution.mesh_shape=[2,2]"]}.items()}
families = {model: layouts(f"model={model}", "task=causal_lm", "distribution=model_parallel", "distribution.mesh_shape=[2,2]",
                           *(["model.num_key_value_heads=2"] if model != "gpt2_tiny" else []))
            for model in ("llama_tiny", "gemma_tiny", "gpt2_tiny")}
print(json.dumps({"runs": ids, "fsdp": layouts("distribution=fsdp"), "families": families, "llama": losses,
                  "tables": {name: layouts(f"distribution={name}", table=True) for name in ("data_parallel", "fsdp")}}))
"""


@pytest.fixture(scope="module")
def sharding(tmp_path_factory):
    """fsdp and data_parallel runs, a Llama run sharded and on one device, and the layouts Keras gave."""
    out = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT, str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_model_parallel_shards_the_keras_hub_families_and_keeps_their_loss(sharding):
    _, report = sharding
    sharded = {"llama_tiny": ["self_attention/query/kernel", "feedforward_gate_dense/kernel",
                              "feedforward_output_dense/kernel"],
               "gemma_tiny": ["attention/query/kernel", "attention/attention_output/kernel", "ffw_gating/kernel",
                              "ffw_linear/kernel"],
               "gpt2_tiny": ["self_attention/value/kernel", "feedforward_intermediate_dense/kernel"]}
    for family, endings in sharded.items():
        specs = report["families"][family]
        for ending in endings:
            paths = [path for path in specs if path.endswith(f"_0/{ending}")]
            assert paths and all("model" in specs[path] for path in paths), (family, ending)
        scales = [path for path in specs if path.endswith(("_scale", "_amax_history"))]
        assert scales and not any("model" in specs[path] for path in scales)  # FP8 state stays replicated
    assert report["llama"]["sharded"] == pytest.approx(report["llama"]["one_device"], rel=1e-3)


@pytest.mark.slow
def test_fsdp_shards_weights_and_optimizer_state_and_follows_the_unsharded_loss_curve(sharding):
    from mlflow.tracking import MlflowClient

    tmp_path, report = sharding
    specs = report["fsdp"]
    kernel = next(path for path in specs if path.endswith("feedforward_intermediate_dense/kernel"))
    assert "batch" in specs[kernel]  # split, not replicated
    moments = [path for path in specs if "feedforward_intermediate_dense_kernel_momentum" in path
               or ("adam" in path and "feedforward_intermediate_dense_kernel" in path)]
    assert moments and all("batch" in specs[path] for path in moments)
    scales = [path for path in specs if path.endswith(("_scale", "_amax_history"))]
    assert scales and not any("batch" in specs[path] for path in scales)  # FP8 state stays replicated
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    curves = {name: [m.value for m in sorted(client.get_metric_history(run_id, "train/loss_step"), key=lambda m: m.step)]
              for name, run_id in report["runs"].items()}
    assert len(curves["fsdp"]) == len(curves["data_parallel"]) == 16
    assert curves["fsdp"] == pytest.approx(curves["data_parallel"], rel=1e-4)
    # fp8/layers.md says how each layer lies: split over the batch axis under fsdp, a copy per device otherwise
    rows = {name: {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table.splitlines()
                   if line.startswith("| ") and "/" in line} for name, table in report["tables"].items()}
    dense = next(path for path in rows["fsdp"] if path.endswith("feedforward_intermediate_dense"))
    assert rows["fsdp"][dense].startswith("sharded (") and "batch" in rows["fsdp"][dense]
    assert rows["data_parallel"][dense] == "replicated"


def test_fsdp_splits_each_matrix_along_its_largest_divisible_axis():
    from fp8exp.run.distribution import fsdp_axes

    assert fsdp_axes((500, 32), 4) == ("batch", None)
    assert fsdp_axes((32, 2, 16), 4) == ("batch", None, None)
    assert fsdp_axes((30, 6), 4) == (None, None)  # nothing divides: whole on every device
    assert fsdp_axes((1024,), 4) == (None,)  # vectors (amax histories, biases) stay replicated


def test_fsdp_never_splits_fp8_bookkeeping_even_where_its_shape_divides():
    """A recipe layer's scale record is (3, 6): over 2, 3 or 6 devices fsdp_axes would split it,
    and with one device per process no process could read it (checkpoints, health checks)."""
    import keras

    from fp8exp.precision.recipes.layers import RECORD
    from fp8exp.run.distribution import FullySharded

    mesh = keras.distribution.DeviceMesh((2,), ["batch"], ["cpu:0", "cpu:1"])
    fsdp = FullySharded(layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch")
    layer = keras.layers.Dense(6)
    layer.build((None, 4))
    record = keras.Variable(keras.ops.zeros((3, 6)), name=RECORD)
    assert fsdp.get_variable_layout(layer.kernel).axes == (None, "batch")  # (4, 6): along its larger axis
    assert fsdp.get_variable_layout(record).axes == (None, None)
