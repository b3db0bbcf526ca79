"""`python -m fp8exp [overrides]`: Hydra's command line, for single runs and `-m` sweeps."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fp8exp.config import ConfigError, register_configs, validate

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
        from fp8exp.experiment import LaunchContext, run_experiment

        return run_experiment(cfg, LaunchContext.from_hydra()).metrics["test/accuracy"]
    except ConfigError as error:
        print(f"fp8exp: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
