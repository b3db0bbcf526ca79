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

        context = LaunchContext.from_hydra()
        if context.sweep:  # a failed job is recorded, and the sweep goes on
            from fp8exp.sweep import run_job

            return run_job(cfg, context)
        return run_experiment(cfg, context).metrics["test/accuracy"]
    except ConfigError as error:
        print(f"fp8exp: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
