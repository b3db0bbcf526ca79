"""Run by tests/test_distribution.py in a fresh interpreter with four virtual CPU devices
(XLA reads its device count once, at start-up): trains the same tiny model on one device,
data-parallel and model-parallel, and prints what the test compares, as JSON."""

import json
import sys

from fp8exp.config import ConfigError, validate
from fp8exp.run.experiment import run_experiment
from tests.conftest import FAST, compose_config

SAME = [*FAST, "trainer.epochs=1", "trainer.batch_size=32", "model.dropout=0", "tracking=none"]


def run(*overrides):
    cfg = compose_config(*SAME, *overrides)
    validate(cfg)
    return run_experiment(cfg).metrics


def main(out: str) -> None:
    import jax

    results = {"devices": jax.device_count()}
    for name, overrides in {"single": ["precision=float32"],
                            "data_parallel": ["precision=float32", "distribution=data_parallel"],
                            "model_parallel": ["precision=float32", "distribution=model_parallel",
                                               "distribution.mesh_shape=[2,2]"],
                            "float8_data_parallel": ["precision=float8", "distribution=data_parallel"]}.items():
        metrics = run(*overrides)
        results[name] = {k: metrics[k] for k in ("test/loss", "test/accuracy")}
        results[name]["fp8_matmuls"] = metrics.get("fp8/gemm/fp8_matmuls")
    try:
        run("distribution=data_parallel", "trainer.batch_size=30")
    except ConfigError as error:
        results["uneven_batch_error"] = str(error)
    import fp8exp.data

    def no_data(config):
        raise AssertionError("the data loaded before the mesh was checked")

    fp8exp.data.load = no_data
    try:  # the default mesh [1, 4] cannot shard the tiny model's 2 heads
        run("distribution=model_parallel")
    except ConfigError as error:
        results["indivisible_error"] = str(error)
    with open(out, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1])
