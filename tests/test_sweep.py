"""Sweeps through the real `python -m fp8exp -m` command: one parent run, a child per job, failed
jobs summarised without stopping the sweep, nothing left RUNNING, bad values rejected up front."""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient

from fp8exp.run.launch import run_name
from tests.conftest import CONF, FAST, ROOT, compose_config, run_cli

SWEEP = ["precision=mixed_bfloat16,float8", "model.hidden_dim=32,64"]
# One short epoch: compiling dominates a job, so fewer steps and FP8 log points are what can go.
TINY = [*FAST, "trainer.epochs=1", "trainer.steps_per_epoch=8", "trainer.eval_steps=2", "tracking.fp8_log_every=4"]
NAMES = {"mixed_bfloat16-h32", "mixed_bfloat16-h64", "float8-h32", "float8-h64"}
METRIC_PREFIXES = ("train/", "val/", "test/", "perf/", "fp8/", "model/", "data/", "system/")


class Faults(Callback):
    """Test-only Hydra callback, added on the command line: the job named `fail` raises in
    training; the job named `kill` receives SIGTERM after its second optimizer step."""

    def __init__(self, fail: str = "", kill: str = ""):
        self.fail, self.kill = fail, kill

    def on_job_start(self, config, **kwargs):
        import keras

        from fp8exp.run import train

        original = train.__dict__.setdefault("unfaulted_fit_and_evaluate", train.fit_and_evaluate)
        name = f"{config.precision.name}-h{config.model.hidden_dim}"

        class SigtermAfterTwoSteps(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 1:
                    os.kill(os.getpid(), signal.SIGTERM)

        def failing(*args, **kwargs):
            raise RuntimeError("injected fault")

        def killed(model, splits, trainer, callbacks, **kwargs):
            return original(model, splits, trainer, [*callbacks, SigtermAfterTwoSteps()], **kwargs)

        train.fit_and_evaluate = failing if name == self.fail else killed if name == self.kill else original


def faults(**names: str) -> list[str]:
    return ["+hydra.callbacks.faults._target_=tests.test_sweep.Faults",
            *(f"+hydra.callbacks.faults.{key}={value}" for key, value in names.items())]


@dataclass
class SweepResult:
    cwd: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.cwd / 'mlflow.db'}")

    def parents(self):
        return self.client.search_runs(self._experiments(), "tags.`sweep.jobs` LIKE '%'")

    def children(self, parent_id: str):
        return self.client.search_runs(self._experiments(), f"tags.mlflow.parentRunId = '{parent_id}'")

    def all_runs(self):
        return self.client.search_runs(self._experiments())

    def _experiments(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]


def run_sweep(cwd: Path, *args: str, timeout: float = 600) -> SweepResult:
    """`python -m fp8exp -m ARGS` in `cwd`, with this checkout importable (for Faults)."""
    with mock.patch.dict(os.environ, {"PYTHONPATH": str(ROOT)}):
        result = run_cli("-m", *args, cwd=cwd, timeout=timeout)
    return SweepResult(cwd, result.returncode, result.stdout, result.stderr)


_SWEEPS: dict[str, SweepResult] = {}


def basic_sweep(tmp_path_factory) -> SweepResult:
    """The 2x2 sweep on Hydra's basic launcher, run once per session and shared with the report
    and UI tests (test_report.py, test_ui.py)."""
    if "basic" not in _SWEEPS:
        _SWEEPS["basic"] = run_sweep(tmp_path_factory.mktemp("basic_sweep"), *SWEEP, *TINY)
    return _SWEEPS["basic"]


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> SweepResult:
    return basic_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> SweepResult:
    """The same sweep on the joblib launcher, two jobs at a time, with float8-h32 failing."""
    return run_sweep(tmp_path_factory.mktemp("parallel_sweep"), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     *SWEEP, *TINY, *faults(fail="float8-h32"))


def assert_sweep_structure(sweep: SweepResult, statuses: dict[str, str]) -> tuple:
    [parent] = sweep.parents()
    children = sweep.children(parent.info.run_id)
    assert sorted(c.info.run_name for c in children) == sorted(statuses)  # none lost, none twice
    assert {c.info.run_name: c.info.status for c in children} == statuses
    assert len(sweep.all_runs()) == len(statuses) + 1
    tags = parent.data.tags
    sweep_dir = Path(tags["sweep.dir"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", str(sweep_dir.relative_to(sweep.cwd / "multirun")))
    assert tags["sweep.overrides"].startswith(" ".join(SWEEP))
    assert tags["sweep.varying"] == "precision model.hidden_dim"
    assert tags["sweep.jobs"] == str(len(statuses))
    for child in children:
        assert child.data.tags["sweep.dir"] == str(sweep_dir)
        assert Path(child.data.tags["hydra.output_dir"]).parent == sweep_dir
        assert (Path(child.data.tags["hydra.output_dir"]) / "__main__.log").is_file()
    return parent, children


@pytest.mark.slow
def test_basic_sweep_nests_one_child_per_job_under_one_parent(basic):
    assert basic.returncode == 0, basic.stderr[-3000:]
    parent, children = assert_sweep_structure(basic, {name: "FINISHED" for name in NAMES})
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.failed"] == "none"
    assert parent.data.tags["sweep.launcher"] == "basic"
    # One output dir per job (the report, when test_report.py ran first, adds `report/` beside them).
    job_dirs = sorted(p.name for p in Path(parent.data.tags["sweep.dir"]).iterdir() if p.name.isdigit())
    assert job_dirs == ["0", "1", "2", "3"]
    assert "fp8exp sweep: 4 of 4 jobs ran, 4 finished, 0 failed" in basic.stdout
    assert f"python -m fp8exp.report --parent {parent.info.run_id}" in basic.stdout
    for child in children:
        assert child.data.params["precision.name"] == child.info.run_name.split("-")[0]
        assert all(key.startswith(METRIC_PREFIXES) for key in child.data.metrics), child.data.metrics.keys()


@pytest.mark.slow
def test_basic_sweep_ends_with_the_report_on_its_parent(basic):
    """The answer where the MLflow run table shows it: summary metrics, the verdict, the description."""
    assert basic.returncode == 0, basic.stderr[-3000:]
    [parent] = basic.parents()
    children = {c.info.run_name: c.data.metrics for c in basic.children(parent.info.run_id)}
    metrics, tags = parent.data.metrics, parent.data.tags
    for name, child in children.items():
        assert metrics[f"summary/{name}/test_accuracy_mean"] == pytest.approx(child["test/accuracy"])
        assert metrics[f"summary/{name}/step_time_ms"] == pytest.approx(child["perf/step_time_ms"])
    for hidden in (32, 64):
        fp8, base = children[f"float8-h{hidden}"], children[f"mixed_bfloat16-h{hidden}"]
        assert metrics[f"summary/float8-h{hidden}/delta_pts"] == pytest.approx(
            100 * (fp8["test/accuracy"] - base["test/accuracy"]))
        assert metrics[f"summary/float8-h{hidden}/speedup"] == pytest.approx(
            base["perf/step_time_ms"] / fp8["perf/step_time_ms"])
        assert f"summary/float8-h{hidden}/delta_ci_low" not in metrics  # one seed: no interval
    assert tags["fp8exp.verdict"].startswith("float8 h32: accuracy ")
    # The crossover line closes it; which one depends on the measured step times, not asserted here.
    assert re.search(r"\| float8 is (never faster than mixed_bfloat16 here|faster than mixed_bfloat16 at \S.*)$",
                     tags["fp8exp.verdict"]) and "\n" not in tags["fp8exp.verdict"]
    assert "| float8         | h64  |" in tags["mlflow.note.content"]
    assert f"run_uuid={parent.info.run_id})" in tags["mlflow.note.content"]
    report = Path(tags["sweep.dir"]) / "report"
    assert f"Report in {report}, on the parent run" in basic.stdout
    assert {a.path for a in basic.client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.md", "report/report.csv", "report/accuracy.png", "report/step_time.png"}


@pytest.mark.slow
def test_parallel_sweep_survives_a_failed_job_and_lists_it(parallel):
    assert parallel.returncode == 1, parallel.stderr[-3000:]
    statuses = {name: "FINISHED" for name in NAMES} | {"float8-h32": "FAILED"}
    parent, children = assert_sweep_structure(parallel, statuses)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sweep.launcher"] == "joblib"
    failed = parent.data.tags["sweep.failed"]
    assert "float8-h32 FAILED: RuntimeError: injected fault" in failed
    log = re.search(r"log: (\S+__main__\.log)", failed).group(1)
    assert "injected fault" in Path(log).read_text()  # the traceback is in the job's own log
    summary = parallel.stdout.split("fp8exp sweep:", 1)[1]
    assert summary.startswith(" 4 of 4 jobs ran, 3 finished, 1 failed")
    assert re.search(r"FAILED\s+float8-h32\s+RuntimeError: injected fault\s+log: " + re.escape(log), summary)


@pytest.mark.slow
def test_a_job_killed_mid_training_leaves_nothing_running(tmp_path):
    sweep = run_sweep(tmp_path, "precision=mixed_bfloat16,float8", *TINY, *faults(kill="mixed_bfloat16-h32"))
    assert sweep.returncode != 0
    [parent] = sweep.parents()
    assert parent.info.status == "KILLED"
    [child] = sweep.children(parent.info.run_id)  # the sweep stopped: float8 never started
    assert (child.info.run_name, child.info.status) == ("mixed_bfloat16-h32", "KILLED")
    job = json.loads((Path(child.data.tags["hydra.output_dir"]) / "fp8exp_job.json").read_text())
    assert job["status"] == "KILLED"


@pytest.mark.parametrize("args,message", [
    (["model.num_heads=4", "model.hidden_dim=32,30"],
     "fp8exp: error: model.hidden_dim: 30 is not divisible by model.num_heads=4; pick a multiple of 4 or change "
     "model.num_heads (sweep job #1: model.num_heads=4 model.hidden_dim=30)"),
    (["precision=mixed_bfloat16,fp16"],
     "fp8exp: error: sweep job #1 (precision=fp16): In 'config': Could not find 'precision/fp16'; "
     "valid: float32, float8, float8_block, float8_current, float8_mxfp8, float8_rowwise, float8_rowwise_gw_hp, mixed_bfloat16, mixed_float16"),
    (["+sweep=precision_ab", "trainer.epochs=0"],
     "fp8exp: error: trainer.epochs: got 0, expected a positive number "
     "(sweep job #0: precision=mixed_bfloat16 trainer.seed=0 +sweep=precision_ab trainer.epochs=0)"),
])
def test_a_bad_value_fails_the_sweep_before_any_job_starts(tmp_path, args, message):
    sweep = run_sweep(tmp_path, *args, timeout=60)
    assert sweep.returncode == 2
    assert sweep.stderr.strip() == message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


def test_prepared_sweeps_need_no_dash_m(tmp_path):
    """`+sweep=` configs switch to multirun themselves (and fail here on the bad value, fast)."""
    with mock.patch.dict(os.environ, {"PYTHONPATH": str(ROOT)}):
        result = run_cli("+sweep=fp8_crossover", "model.num_heads=3", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "(sweep job #0: precision=mixed_bfloat16 model.hidden_dim=128 trainer.seed=0" in result.stderr


@pytest.mark.parametrize("swept,expected", [
    ([], "float8-h256"),
    (["precision=float8", "model.hidden_dim=256", "trainer.seed=1"], "float8-h256-s1"),
    (["trainer.learning_rate=0.01", "model=small"], "float8-h256-learning_rate=0.01-small"),
])
def test_child_runs_are_named_from_what_varies(swept, expected):
    cfg = compose_config("precision=float8", "model.hidden_dim=256", "model.num_heads=4")
    assert run_name(cfg, swept) == expected


def readme_sweeps() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Sweeps and the report", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("command", readme_sweeps())
def test_readme_sweeps_expand_to_valid_jobs(command):
    """The README's sweep commands, expanded and validated as the launching process does."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from fp8exp.run.jobs import job_overrides, validated_jobs

    args = [arg for arg in command.split()[3:] if arg != "-m"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        master = GlobalHydra.instance().config_loader().load_configuration("config", args, RunMode.MULTIRUN)
        jobs = job_overrides(master)
        assert len(validated_jobs(master, jobs)) == len(jobs) > 1


# --- the launcher's callback alone: made-up job records, no training --------------------------------

@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """start(*overrides) makes the SweepCallback from conf/hydra/callbacks/sweep.yaml and runs its
    on_multirun_start on the launching process's config, as Hydra would (the SIGTERM handler left
    out, exit hooks captured instead of registered); returns (callback, config, exit hooks)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from hydra.utils import instantiate

    from fp8exp.run import sweep

    hooks = []
    monkeypatch.setattr(sweep, "interrupt_on_sigterm", lambda: None)
    monkeypatch.setattr(sweep.atexit, "register", hooks.append)

    def start(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            config = GlobalHydra.instance().config_loader().load_configuration(
                "config", [*FAST, f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides], RunMode.MULTIRUN)
            callback = instantiate(config.hydra.callbacks.sweep)
            callback.on_multirun_start(config)
        return callback, config, hooks

    return start


def job_records(callback, *statuses: str) -> None:
    from fp8exp.run.jobs import JobRecord

    for num, status in enumerate(statuses):
        output_dir = Path(callback.sweep.dir, str(num))
        output_dir.mkdir()
        JobRecord(num, f"job{num}", [f"trainer.seed={num}"], None).save(
            str(output_dir), status=status, error=None if status == "FINISHED" else "RuntimeError: boom",
            test_accuracy=0.5)


def test_a_store_failing_at_the_end_still_gets_the_summary_exit_code_and_one_warning(launcher, tmp_path,
                                                                                       monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback, config, hooks = launcher("trainer.seed=0,1", f"tracking.uri={store}")
    parent = callback.sweep.parent_run_id
    job_records(callback, "FINISHED", "FAILED")
    capsys.readouterr()  # MLflow's notes on creating the store

    def store_fails(self, *args, **kwargs):
        raise MlflowException("database is locked\nand more")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_terminated", store_fails)
        with pytest.raises(SystemExit) as exited:
            callback.on_multirun_end(config)
        [at_exit] = [hook for hook in hooks if getattr(hook, "__self__", None) is callback]
        at_exit()  # the store still fails: no second warning
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert "fp8exp sweep: 2 of 2 jobs ran, 1 finished, 1 failed" in out
    [warning] = err.strip().splitlines()
    assert warning.startswith(f"fp8exp: warning: could not end the sweep's parent run {parent} as FAILED")
    assert f"set_terminated('{parent}', 'FAILED')" in warning
    at_exit()  # the store is back: the parent ends as decided, not KILLED
    assert MlflowClient(store).get_run(parent).info.status == "FAILED"
    assert capsys.readouterr().err == ""


def test_a_sweeper_that_does_not_say_how_many_jobs_is_not_a_failed_sweep(launcher, capsys):
    callback, config, hooks = launcher("hydra.sweeper._target_=hydra_plugins.example.OtherSweeper", "tracking=none")
    job_records(callback, "FINISHED", "FINISHED")
    callback.on_multirun_end(config)  # no SystemExit: nothing failed, nothing known to be missing
    assert "fp8exp sweep: 2 jobs ran, 2 finished, 0 failed" in capsys.readouterr().out


def log_children(store: str, parent: str, accuracy: dict[str, float]) -> None:
    """Finished child runs under `parent`, one per precision, as the jobs would have logged them."""
    client = MlflowClient(store)
    experiment = client.get_run(parent).info.experiment_id
    for precision, value in accuracy.items():
        run = client.create_run(experiment, run_name=f"{precision}-h32", tags={"mlflow.parentRunId": parent})
        for key, param in {"precision.name": precision, "model.hidden_dim": "32", "trainer.seed": "0"}.items():
            client.log_param(run.info.run_id, key, param)
        client.log_metric(run.info.run_id, "test/accuracy", value)
        client.log_metric(run.info.run_id, "perf/step_time_ms", 10.0)
        client.set_terminated(run.info.run_id)


@pytest.mark.parametrize("report", [True, False])
def test_the_report_at_the_end_of_a_sweep_can_be_turned_off(launcher, tmp_path, capsys, report):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    off = [] if report else ["hydra.callbacks.sweep.report=false"]
    callback, config, _ = launcher("precision=mixed_bfloat16,float8", f"tracking.uri={store}",
                                   f"tracking.artifact_root={tmp_path / 'artifacts'}", *off)
    assert callback.report is report
    parent = callback.sweep.parent_run_id
    log_children(store, parent, {"mixed_bfloat16": 0.90, "float8": 0.88})
    job_records(callback, "FINISHED", "FINISHED")
    callback.on_multirun_end(config)  # no SystemExit: both jobs finished

    run = MlflowClient(store).get_run(parent)
    assert run.info.status == "FINISHED"
    published = {"fp8exp.verdict", "mlflow.note.content"} & set(run.data.tags)
    summary = {key: value for key, value in run.data.metrics.items() if key.startswith("summary/")}
    out = capsys.readouterr().out
    if report:
        assert published == {"fp8exp.verdict", "mlflow.note.content"}
        assert summary["summary/float8-h32/delta_pts"] == pytest.approx(-2.0)
        assert summary["summary/mixed_bfloat16-h32/test_accuracy_mean"] == pytest.approx(0.90)
        assert f"Report in {Path(callback.sweep.dir) / 'report'}, on the parent run" in out
        assert run.data.tags["fp8exp.verdict"] in out
    else:
        assert not published and not summary
        assert not (Path(callback.sweep.dir) / "report").exists()
        assert "Report in" not in out and f"Compare: python -m fp8exp.report --parent {parent}" in out


def test_a_failing_report_costs_one_warning_not_the_exit_code_or_the_ending(launcher, tmp_path, monkeypatch, capsys):
    from fp8exp.report import parent as report_parent

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback, config, _ = launcher("trainer.seed=0,1", f"tracking.uri={store}",
                                   f"tracking.artifact_root={tmp_path / 'artifacts'}")
    parent = callback.sweep.parent_run_id
    job_records(callback, "FINISHED", "FINISHED")
    capsys.readouterr()

    def broken(*args, **kwargs):
        raise ValueError("no plots today\nsecond line")

    monkeypatch.setattr(report_parent, "report_sweep", broken)
    callback.on_multirun_end(config)  # no SystemExit
    [warning] = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"fp8exp: warning: no report on the sweep's parent run {parent} "
                              "(ValueError: no plots today); make it later: python -m fp8exp.report")
    assert MlflowClient(store).get_run(parent).info.status == "FINISHED"


def test_a_sweep_with_no_finished_job_skips_the_report_with_a_note(launcher, tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback, config, _ = launcher("trainer.seed=0,1", f"tracking.uri={store}",
                                   f"tracking.artifact_root={tmp_path / 'artifacts'}")
    job_records(callback, "FAILED", "FAILED")
    with pytest.raises(SystemExit) as exited:
        callback.on_multirun_end(config)
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert "No report on the parent run: no job finished." in out and "warning" not in err
    run = MlflowClient(store).get_run(callback.sweep.parent_run_id)
    assert run.info.status == "FAILED" and "fp8exp.verdict" not in run.data.tags
