"""Beyond one machine: each launcher config composes, and a sweep through submitit's local
executor runs its jobs as separate processes whose child runs land under one parent."""

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from tests.test_sweep import TINY, run_sweep


@pytest.mark.parametrize("launcher,target", [
    ("slurm", "SlurmLauncher"), ("local_parallel", "JoblibLauncher"), ("submitit_local", "LocalLauncher")])
def test_launcher_configs_compose(launcher, target):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.signal_delay_s == 120 and cfg.hydra.launcher.max_num_timeout == 3


@pytest.mark.slow
def test_submitit_local_sweep_lands_children_under_one_parent(tmp_path):
    sweep = run_sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                      "precision=mixed_bfloat16,float8", *TINY)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    [parent] = sweep.parents()
    children = sweep.children(parent.info.run_id)
    assert sorted(c.info.run_name for c in children) == ["float8-h32", "mixed_bfloat16-h32"]
    assert {c.info.status for c in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.launcher"] == "submitit_local"
    assert list((tmp_path / "multirun").glob("*/*/.submitit/*"))  # the jobs ran as submitit processes


def test_a_second_sweep_into_the_same_directory_is_refused(tmp_path):
    sweep_dir = tmp_path / "multirun" / "same"
    (sweep_dir).mkdir(parents=True)
    (sweep_dir / "fp8exp_sweep.json").write_text("{}")
    sweep = run_sweep(tmp_path, f"hydra.sweep.dir={sweep_dir}", "precision=mixed_bfloat16,float8", *TINY)
    assert sweep.returncode == 2
    assert "hydra.sweep.dir: " in sweep.stderr and "already holds a sweep" in sweep.stderr
    assert not (tmp_path / "mlflow.db").exists()
