"""The README's examples are run, so they cannot rot. Each command line is composed exactly as
`python -m fp8exp` would compose it and run in-process (the CLI itself is covered by
test_cli.py), shrunk to a few short steps, with outputs in a temporary directory."""

import os

import pytest

from fp8exp.config import validate
from fp8exp.run.experiment import run_experiment
from tests.conftest import CLOTHING, ROOT, compose_config

SHRINK = ["trainer.epochs=1", "trainer.steps_per_epoch=4", "trainer.eval_steps=2",
          "data.sequence_length=32", "data.vocabulary_size=500"]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Examples", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_has_examples():
    commands = readme_commands()
    assert len(commands) >= 3 and all(c.startswith("python -m fp8exp ") for c in commands)


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_readme_example_runs(command, store, monkeypatch):
    if "../shared/data/" in command and not CLOTHING.is_file():
        pytest.skip(f"{CLOTHING} is absent")
    monkeypatch.chdir(ROOT)  # relative paths in the examples are relative to the repository
    args = command.split()[3:]
    keys = {arg.split("=")[0] for arg in args}
    shrink = [arg for arg in SHRINK if arg.split("=")[0] not in keys]
    if "data=synthetic" not in args:
        shrink.append(f"data.cache_dir={store / 'cache'}")
    cfg = compose_config(*args, *shrink, f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                         f"tracking.artifact_root={store / 'artifacts'}")
    validate(cfg)
    outcome = run_experiment(cfg)
    assert 0.0 <= outcome.metrics["test/accuracy"] <= 1.0
    assert not os.path.exists(ROOT / "mlflow.db") or "tracking" in keys
