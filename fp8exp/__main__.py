"""`python -m fp8exp [overrides]`: Hydra's command line, for single runs and `-m` sweeps."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fp8exp.config import ConfigError, register_configs, validate

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    in_sweep = False
    try:
        validate(cfg)
        from fp8exp.run.experiment import LaunchContext, run_experiment

        context = LaunchContext.from_hydra()
        if context.sweep:  # a failed job is recorded, and the sweep goes on
            from fp8exp.run.jobs import run_job

            in_sweep = True
            return run_job(cfg, context)
        return run_experiment(cfg, context).metrics["test/accuracy"]
    except ConfigError as error:
        print(f"fp8exp: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:  # the run is KILLED; exit 128 + signal (130 Ctrl-C, 143 SIGTERM)
        from fp8exp.run.stopping import Interrupted

        if in_sweep:  # the launcher stops the sweep and ends its parent run KILLED
            raise
        print(f"fp8exp: {error}" if isinstance(error, Interrupted) else "fp8exp: interrupted", file=sys.stderr)
        sys.exit(error.exit_code if isinstance(error, Interrupted) else 130)
    except Exception as error:
        from fp8exp.run.stopping import NumericalFault

        if not isinstance(error, NumericalFault):
            raise
        print(f"fp8exp: error: {error}", file=sys.stderr)  # the run is FAILED, with the details as tags
        sys.exit(1)


if __name__ == "__main__":
    main()
