"""Loss parity for causal_lm sweeps (fp8exp/report/parity.py): the relative loss error
loss_fp8 / loss_bf16 - 1 of the final val/loss and its paired 95% CI on hand-made runs with known
losses, the three verdicts and the too-few-seeds case, the curves plot, the CSV columns, the parent
run's summary metrics and verdict tag, and the threshold from the CLI and from the sweep callback."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from fp8exp.report import parity as report_parity
from fp8exp.report.__main__ import main as report_main
from fp8exp.report.plots import curve_key, loss_curve
from fp8exp.report.rows import build_rows
from fp8exp.report.runs import RunData
from tests.conftest import CONF
from tests.test_report import log_sweep
from tests.test_sweep import job_records, launcher  # noqa: F401  (launcher is a fixture)

MODELS = {"llama_tiny": ("64", "2"), "llama_small": ("384", "6")}
BF16, FP8 = "mixed_bfloat16", "float8"
T = stats.t.ppf(0.975, 2)  # three seeds: two degrees of freedom


def lm_params(precision: str, model: str, seed: str) -> dict[str, str]:
    hidden, layers = MODELS[model]
    family, size = model.split("_")
    return {"task.name": "causal_lm", "precision.name": precision, "model.family": family, "model.size": size,
            "model.hidden_dim": hidden, "model.num_layers": layers, "trainer.seed": seed,
            "precision.amax_history_length": "1024" if precision == FP8 else "null"}


def log_lm_sweep(uri: str, final: dict[tuple[str, str, str], float], steps: bool = False,
                 experiment: str = "fp8exp") -> str:
    """A causal_lm sweep as the jobs log it: `final` maps (precision, model, seed) -> the last
    val/loss (epoch 3; epochs 1 and 2 are higher); with `steps` also val/loss_step every 10 steps."""
    client = MlflowClient(uri)
    artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
    experiment_id = client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment_id, run_name="lm_parity", tags={"sweep.jobs": str(len(final))}).info.run_id
    for (precision, model, seed), loss in final.items():
        run_id = client.create_run(experiment_id, run_name=f"{precision}-{model}-s{seed}",
                                   tags={"mlflow.parentRunId": parent, "device": "cpu:cpu x1"}).info.run_id
        metrics = [Metric("val/loss", loss + 0.5 * (3 - epoch), 0, epoch) for epoch in (1, 2, 3)]
        metrics += [Metric("test/accuracy", 0.2, 0, 0), Metric("test/loss", loss, 0, 0),
                    Metric("perf/step_time_ms", 12.5 if precision == FP8 else 10.0, 0, 0)]
        if steps:
            metrics += [Metric("val/loss_step", loss + 0.01 * (60 - step), 0, step) for step in range(10, 70, 10)]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in lm_params(precision, model, seed).items()],
                         tags=[RunTag("fp8exp", "test")])
        client.set_terminated(run_id)
    client.set_terminated(parent)
    return parent


def losses(bf16: list[float], fp8: list[float], model: str = "llama_small") -> dict[tuple[str, str, str], float]:
    return {**{(BF16, model, str(s)): v for s, v in enumerate(bf16)},
            **{(FP8, model, str(s)): v for s, v in enumerate(fp8)}}


# Errors 0.1%, 0.2%, 0.3% on the small model: mean 0.2%, sd 0.1%.
KNOWN = losses([2.0, 2.0, 2.0], [2.002, 2.004, 2.006])
HALF = T * 0.001 / math.sqrt(3)  # by hand: t(0.975, 2) * sd / sqrt(n)


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as handle:
        return {(row["precision"], row["model.hidden_dim"]): row for row in csv.DictReader(handle)}


def rows_of(final: dict[tuple[str, str, str], float]):
    return build_rows([RunData(f"{p}{m}{s}", f"{p}-{m}-s{s}", "FINISHED", lm_params(p, m, s),
                               {"val/loss": loss, "test/accuracy": 0.2, "perf/step_time_ms": 10.0})
                       for (p, m, s), loss in final.items()])


# ---------------------------------------------------------------- the numbers


def test_relative_loss_error_and_its_ci_on_known_losses(uri, tmp_path, capsys):
    parent = log_lm_sweep(uri, {**KNOWN, **losses([3.0, 3.0, 3.0], [3.0, 3.003, 3.006], "llama_tiny")})
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out

    table = read_csv(tmp_path / "out" / "report.csv")
    small = table[(FP8, "384")]
    assert float(small["rel_loss_error"]) == pytest.approx(0.002)
    assert (float(small["rel_loss_error_ci_low"]), float(small["rel_loss_error_ci_high"])) == \
        pytest.approx((0.002 - HALF, 0.002 + HALF))
    assert small["rel_loss_error_n"] == "3" and small["parity_verdict"] == "undecided: CI too wide"
    assert float(small["val_loss_mean"]) == pytest.approx(2.004)  # the last val/loss, not an earlier epoch
    assert float(table[(BF16, "384")]["val_loss_mean"]) == pytest.approx(2.0)
    assert table[(BF16, "384")]["rel_loss_error"] == ""
    assert float(table[(FP8, "64")]["rel_loss_error"]) == pytest.approx(0.001)  # 0%, 0.1%, 0.2%

    line = ("float8 h384: final val loss +0.200% vs mixed_bfloat16 [95% CI "
            f"{(0.002 - HALF) * 100:+.3f}%, {(0.002 + HALF) * 100:+.3f}%] -> undecided: CI too wide "
            "(threshold 0.25%); 0.80x (20% slower)")
    assert f"- {line}" in out  # the headline, instead of the accuracy one
    assert "float8 h384: accuracy" not in out
    assert "## Loss parity (causal_lm)" in out
    [cells] = [[c.strip() for c in row.split("|")[1:-1]] for row in out.splitlines()
               if row.startswith("| float8 h384 (llama_small)")]
    assert cells[3] == f"+0.200% [{(0.002 - HALF) * 100:+.3f}%, {(0.002 + HALF) * 100:+.3f}%] (paired, n=3)"
    assert cells[4] == "0: +0.100%, 1: +0.200%, 2: +0.300%"
    assert "Tiny models (`*_tiny`, `model.size=tiny`) are toys" in out
    assert any(line.startswith("| float8 h64 (llama_tiny)") for line in out.splitlines())

    run = MlflowClient(uri).get_run(parent)
    summary = {k: v for k, v in run.data.metrics.items() if k.startswith("summary/")}
    assert summary["summary/float8-h384/rel_loss_error_pct"] == pytest.approx(0.2)
    assert summary["summary/float8-h384/rel_loss_error_ci_low_pct"] == pytest.approx((0.002 - HALF) * 100)
    assert summary["summary/float8-h384/rel_loss_error_ci_high_pct"] == pytest.approx((0.002 + HALF) * 100)
    assert summary["summary/float8-h384/val_loss_mean"] == pytest.approx(2.004)
    assert summary["summary/mixed_bfloat16-h384/val_loss_mean"] == pytest.approx(2.0)
    assert "summary/mixed_bfloat16-h384/rel_loss_error_pct" not in summary
    assert summary["summary/float8-h384/speedup"] == pytest.approx(0.8)  # the classify summary stays
    assert line in run.data.tags["fp8exp.verdict"].split(" | ")
    assert "## Loss parity (causal_lm)" in run.data.tags["mlflow.note.content"]
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert "report/loss_parity.png" in logged


def parity_of(final, threshold: float = report_parity.PARITY_THRESHOLD):
    [found] = report_parity.loss_parity(rows_of(final), threshold)
    return found


@pytest.mark.parametrize("fp8,threshold,verdict", [
    ([2.002, 2.004, 2.006], 0.0025, "undecided: CI too wide"),  # [-0.05%, +0.45%] straddles +0.25%
    ([2.002, 2.004, 2.006], 0.005, "parity"),                   # all of it below +0.5%
    ([2.010, 2.012, 2.014], 0.0025, "worse"),                   # [+0.35%, +0.85%]: all above +0.25%
    ([1.990, 1.992, 1.994], 0.0025, "parity"),                  # FP8 lower than BF16 is parity too
])
def test_three_verdicts_against_the_threshold(fp8, threshold, verdict):
    found = parity_of(losses([2.0, 2.0, 2.0], fp8), threshold)
    errors = [v / 2.0 - 1 for v in fp8]
    expected = stats.ttest_1samp(errors, 0).confidence_interval(0.95)
    assert found.n == 3 and list(found.errors.values()) == pytest.approx(errors)
    assert (found.low, found.high) == pytest.approx((expected.low, expected.high))
    assert found.verdict == verdict


def test_errors_are_paired_by_seed_not_by_mean():
    """Per seed, loss_fp8 / loss_bf16 - 1 on that seed's own baseline (1%, 2%, 3%: mean 2%), not the
    ratio of the mean losses (9.2 / 9 - 1 = 2.2%)."""
    found = parity_of(losses([2.0, 3.0, 4.0], [2.02, 3.06, 4.12]))
    assert list(found.errors.values()) == pytest.approx([0.01, 0.02, 0.03])
    assert found.mean == pytest.approx(0.02)
    constant = parity_of(losses([2.0, 3.0, 4.0], [2.02, 3.03, 4.04]))  # 1% on every seed
    assert constant.mean == pytest.approx(0.01)
    assert constant.low is None and constant.verdict == "no variance across seeds: CI undefined"
    same = parity_of(losses([2.0, 3.0, 4.0], [2.0, 3.0, 4.0]))
    assert same.verdict == "parity (identical on every seed)"


def test_fewer_than_three_seeds_give_no_ci_and_say_so(uri, tmp_path, capsys):
    final = {k: v for k, v in KNOWN.items() if k[2] != "2"}  # seeds 0 and 1: errors 0.1%, 0.2%
    final[(FP8, "llama_small", "7")] = 2.5  # no baseline for seed 7: not paired
    found = parity_of(final)
    assert found.n == 2 and found.mean == pytest.approx(0.0015)
    assert (found.low, found.high) == (None, None)
    assert found.verdict == "too few seeds for a CI (n=2, needs 3): no verdict"
    assert found.only_here == ("7",)

    log_lm_sweep(uri, final)
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert ("- float8 h384: final val loss +0.150% vs mixed_bfloat16 -> too few seeds for a CI (n=2, needs 3): "
            "no verdict (threshold 0.25%)") in out
    assert "float8 h384: seeds 7 without a mixed_bfloat16 run: left out of the loss pairing." in out
    row = read_csv(tmp_path / "out" / "report.csv")[(FP8, "384")]
    assert (row["rel_loss_error_ci_low"], row["rel_loss_error_ci_high"], row["rel_loss_error_n"]) == ("", "", "2")


def test_the_threshold_option_changes_the_verdict_not_the_numbers(uri, tmp_path, capsys):
    parent = log_lm_sweep(uri, KNOWN)
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "out"), "--parity-threshold", "0.005"]) == 0
    assert "-> parity (threshold 0.50%)" in capsys.readouterr().out
    run = MlflowClient(uri).get_run(parent)
    assert "-> parity (threshold 0.50%)" in run.data.tags["fp8exp.verdict"]
    assert run.data.metrics["summary/float8-h384/rel_loss_error_pct"] == pytest.approx(0.2)
    with pytest.raises(SystemExit):
        report_main(["--tracking-uri", uri, "--parity-threshold", "2"])


# ---------------------------------------------------------------- the curves


def test_curves_use_the_step_series_when_logged(uri, tmp_path):
    log_lm_sweep(uri, KNOWN, steps=True)
    client = MlflowClient(uri)
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("fp8exp").experiment_id])
             if r.info.run_name == "float8-llama_small-s1"]
    client.log_batch(run.info.run_id, [Metric("val/loss_step", 2.5, 1, 20)])  # step 20 again, later (a resume)
    data = RunData(run.info.run_id, run.info.run_name, "FINISHED", dict(run.data.params), dict(run.data.metrics))
    assert loss_curve(client, data, "val/loss_step") == pytest.approx(
        {s: 2.5 if s == 20 else 2.004 + 0.01 * (60 - s) for s in range(10, 70, 10)})
    assert loss_curve(client, data, "val/loss") == pytest.approx({1: 3.004, 2: 2.504, 3: 2.004})
    [row] = [r for r in build_rows([data]) if r.precision == FP8]
    assert curve_key([row]) == "val/loss_step"
    data.metrics.pop("val/loss_step")  # a run without the step series: the per-epoch one for the panel
    assert curve_key([row]) == "val/loss"
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "loss_parity.png").stat().st_size > 10_000
    assert "![validation loss by precision](loss_parity.png)" in (tmp_path / "out" / "report.md").read_text()


def test_one_panel_per_size_baseline_first():
    rows = rows_of({**KNOWN, **losses([3.0] * 3, [3.0] * 3, "llama_tiny")})
    panels = report_parity.curve_panels(rows, report_parity.loss_parity(rows))
    assert [title for title, _ in panels] == [
        "h64 (llama_tiny)\nfloat8: +0.000%, parity (identical on every seed)",
        (f"h384 (llama_small)\nfloat8: +0.200% [{(0.002 - HALF) * 100:+.3f}%, {(0.002 + HALF) * 100:+.3f}%], "
         "undecided: CI too wide")]
    assert [[row.precision for row in group] for _, group in panels] == [[BF16, FP8], [BF16, FP8]]


# ---------------------------------------------------------------- classify reports stay as they were


def test_a_classify_report_has_no_loss_parity(uri, tmp_path, capsys):
    log_sweep(uri, [{"precision": p, "hidden": "32", "seed": s, "test/accuracy": 0.9, "perf/step_time_ms": 10.0}
                    for p in (BF16, FP8) for s in "012"])
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Loss parity" not in out and "final val loss" not in out
    assert not (tmp_path / "out" / "loss_parity.png").exists()
    with (tmp_path / "out" / "report.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[-1] == "superseded_run_ids" and "rel_loss_error" not in header


# ---------------------------------------------------------------- the sweep's own report


def test_the_sweep_callback_passes_its_parity_threshold(launcher, tmp_path, capsys):  # noqa: F811
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback, config, _ = launcher("precision=mixed_bfloat16,float8", f"tracking.uri={store}",
                                   f"tracking.artifact_root={tmp_path / 'artifacts'}",
                                   "report.parity_threshold=0.005")
    assert callback.parity_threshold == 0.005
    client = MlflowClient(store)
    experiment = client.get_run(callback.sweep.parent_run_id).info.experiment_id
    for (precision, model, seed), loss in KNOWN.items():
        run = client.create_run(experiment, run_name=f"{precision}-s{seed}",
                                tags={"mlflow.parentRunId": callback.sweep.parent_run_id})
        client.log_batch(run.info.run_id, metrics=[Metric("val/loss", loss, 0, 1), Metric("test/accuracy", 0.2, 0, 0)],
                         params=[Param(k, v) for k, v in lm_params(precision, model, seed).items()])
        client.set_terminated(run.info.run_id)
    job_records(callback, "FINISHED", "FINISHED")
    callback.on_multirun_end(config)
    verdict = client.get_run(callback.sweep.parent_run_id).data.tags["fp8exp.verdict"]
    assert "float8 h384: final val loss +0.200% vs mixed_bfloat16" in verdict and "-> parity (threshold 0.50%)" in verdict


def test_the_default_threshold_is_the_same_everywhere():
    from fp8exp.config.schema import ReportConfig
    from fp8exp.run.sweep import SweepCallback

    assert ReportConfig().parity_threshold == SweepCallback.parity_threshold == report_parity.PARITY_THRESHOLD == 0.0025


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_bad_sweep_threshold_stops_the_sweep_up_front(launcher, tmp_path, capsys, value):  # noqa: F811
    with pytest.raises(SystemExit) as exited:
        launcher("tracking=none", f"report.parity_threshold={value}")
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().startswith(
        f"fp8exp: error: report.parity_threshold: got {float(value)}, expected a fraction in [0, 1), "
        "e.g. 0.0025 for 0.25% relative loss error (sweep job #0: ")


def test_a_seed_that_diverged_makes_the_verdict_worse(uri, tmp_path, capsys):
    """Seeds 0-3 agree within 0.1%, but float8 seed 4 failed non-finite: that, not the survivors, decides."""
    final = losses([2.0] * 4, [2.001, 2.002, 2.001, 2.002])
    parent = log_lm_sweep(uri, final)
    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    failed = client.create_run(experiment, run_name="float8-llama_small-s4", tags={
        "mlflow.parentRunId": parent, "failure.reason": "non_finite", "failure.step": "37"}).info.run_id
    client.log_batch(failed, params=[Param(k, v) for k, v in lm_params(FP8, "llama_small", "4").items()])
    client.set_terminated(failed, "FAILED")
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "-> worse: diverged (non-finite) on seed 4 (threshold 0.25%)" in out
    assert read_csv(tmp_path / "out" / "report.csv")[(FP8, "384")]["parity_verdict"] == \
        "worse: diverged (non-finite) on seed 4"
