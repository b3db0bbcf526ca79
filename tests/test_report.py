"""`python -m fp8exp.report`: statistics against scipy's own, tables checked against the runs'
metrics, files written and logged on the parent run, and the cases with nothing to compare."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from fp8exp.precision.scales import SCALED_TENSORS
from fp8exp.report import parent as report_parent
from fp8exp.report import stats as report_stats
from fp8exp.report import tables as report_tables
from fp8exp.report.__main__ import main as report_main
from fp8exp.report.rows import Row, build_rows
from fp8exp.report.runs import RunData
from tests.test_sweep import basic_sweep

REPORT_FILES = {"report.md", "report.csv", "accuracy.png", "step_time.png"}


def log_sweep(uri: str, runs: list[dict], experiment: str = "fp8exp") -> str:
    """A sweep as fp8exp logs it, without training: returns the parent run id."""
    client = MlflowClient(uri)
    artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
    experiment_id = client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={"sweep.jobs": str(len(runs))}).info.run_id
    for spec in runs:
        precision, hidden, seed = spec["precision"], spec["hidden"], spec["seed"]
        run_id = client.create_run(experiment_id, run_name=f"{precision}-h{hidden}-s{seed}", start_time=spec.get("start"),
                                   tags={"mlflow.parentRunId": parent, "device": "cpu:cpu x1"}).info.run_id
        params = {"precision.name": precision, "model.hidden_dim": hidden, "model.intermediate_dim": hidden,
                  "trainer.seed": seed, "precision.amax_history_length": 1024 if precision == "float8" else "null"}
        metrics = [Metric(k, spec[k], 0, 32) for k in ("test/accuracy", "perf/step_time_ms") if k in spec]
        metrics += [Metric("perf/examples_per_s", 32000 / spec.get("perf/step_time_ms", 1), 0, 32),
                    Metric("model/params", 1000 * int(hidden), 0, 0)]
        if precision == "float8" and spec.get("fp8", True):
            metrics += [Metric(f"fp8/{layer}/{tensor}_scale", 0.01 * step, 0, step)
                        for layer in ("dense", "head") for tensor in SCALED_TENSORS for step in (8, 16)]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("fp8exp", "test")])
        client.set_terminated(run_id, spec.get("status", "FINISHED"), spec["start"] + 1000 if "start" in spec else None)
    client.set_terminated(parent)
    return parent


def grid(accuracy: dict[tuple, float], step_ms: dict[str, float]) -> list[dict]:
    return [{"precision": p, "hidden": h, "seed": s, "test/accuracy": a, "perf/step_time_ms": step_ms[p] * int(h) / 32}
            for (p, h, s), a in accuracy.items()]


def make_report(uri: str, out: Path, *args: str) -> int:
    return report_main(["--tracking-uri", uri, "--out", str(out), *args])


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as handle:
        return {(row["precision"], row["model.hidden_dim"]): row for row in csv.DictReader(handle)}


def table_row(markdown: str, label: str) -> list[str]:
    """The Markdown table's cells for one configuration, e.g. "float8 h32"."""
    precision, size = label.split()
    [cells] = [[c.strip() for c in line.split("|")[1:-1]] for line in markdown.splitlines()
               if line.startswith(f"| {precision} ") and line.split("|")[2].strip() == size]
    return cells


# ---------------------------------------------------------------- statistics


def test_paired_delta_matches_scipy_paired_t_interval():
    fp8 = {"0": 0.81, "1": 0.84, "2": 0.80, "3": 0.83}
    bf16 = {"0": 0.83, "1": 0.85, "2": 0.83, "3": 0.84}
    delta = report_stats.delta_ci(fp8, bf16)
    expected = stats.ttest_rel(list(fp8.values()), list(bf16.values())).confidence_interval(0.95)
    assert delta.paired and delta.n == 4
    assert delta.mean == pytest.approx(-0.0175)
    assert (delta.low, delta.high) == pytest.approx((expected.low, expected.high))
    assert delta.verdict == "LOST accuracy"


def test_unmatched_seeds_fall_back_to_welch():
    fp8, bf16 = {"0": 0.80, "1": 0.86, "2": 0.83}, {"5": 0.84, "6": 0.82, "7": 0.85}
    delta = report_stats.delta_ci(fp8, bf16)
    expected = stats.ttest_ind(list(fp8.values()), list(bf16.values()), equal_var=False).confidence_interval(0.95)
    assert not delta.paired
    assert (delta.low, delta.high) == pytest.approx((expected.low, expected.high))
    assert delta.verdict == "no clear accuracy change"


def test_one_seed_has_no_interval():
    delta = report_stats.delta_ci({"0": 0.9}, {"0": 0.8})
    assert delta.low is None and delta.verdict == "one seed: no CI"
    assert delta.mean == pytest.approx(0.1)


def test_zero_variance_gives_no_interval_and_no_gain_or_loss():
    # 128 test examples: float8 is exactly one example worse on both seeds (differences equal up to rounding)
    paired = report_stats.delta_ci({"0": 0.9453, "1": 0.9531}, {"0": 0.9531, "1": 0.9609})
    assert paired.paired and paired.n == 2 and (paired.low, paired.high) == (None, None)
    assert paired.verdict == "no variance across seeds: CI undefined"
    welch = report_stats.delta_ci({"0": 0.95, "1": 0.95, "2": 0.95}, {"5": 0.96, "6": 0.96, "7": 0.96})
    assert not welch.paired and (welch.low, welch.high) == (None, None)
    assert welch.verdict == "no variance across seeds: CI undefined"
    same = report_stats.delta_ci({s: 0.9 for s in "012"}, {s: 0.9 for s in "012"})
    assert same.mean == 0 and same.verdict == "identical on every seed"


def test_two_seeds_give_an_interval_but_no_verdict():
    fp8, bf16 = {"0": 0.800, "1": 0.811}, {"0": 0.900, "1": 0.910}  # the interval alone would say LOST
    paired = report_stats.delta_ci(fp8, bf16)
    expected = stats.ttest_rel(list(fp8.values()), list(bf16.values())).confidence_interval(0.95)
    assert (paired.low, paired.high) == pytest.approx((expected.low, expected.high)) and paired.high < 0
    assert paired.verdict == "too few seeds to decide (n=2)"
    welch = report_stats.delta_ci({"0": 0.80, "1": 0.81, "2": 0.80}, {"5": 0.90, "6": 0.91})
    assert not welch.paired and welch.high < 0
    assert welch.verdict == "too few seeds to decide (n=2)"


def test_unmatched_seeds_are_named_and_the_rest_still_paired():
    fp8 = {"0": 0.81, "1": 0.84, "2": 0.80, "3": 0.70}
    bf16 = {"0": 0.83, "1": 0.85, "2": 0.83, "4": 0.99}
    delta = report_stats.delta_ci(fp8, bf16)
    expected = stats.ttest_rel([0.81, 0.84, 0.80], [0.83, 0.85, 0.83]).confidence_interval(0.95)
    assert delta.paired and delta.n == 3 and delta.common == ("0", "1", "2")
    assert (delta.only_here, delta.only_baseline) == (("3",), ("4",))
    assert (delta.low, delta.high) == pytest.approx((expected.low, expected.high))


@pytest.mark.parametrize("speedup,words", [
    (1.25, "1.25x (25% faster)"), (0.94, "0.94x (6% slower)"), (0.8, "0.80x (20% slower)"),
    (1.01, "1.01x (no clear speed change)"), (1.0, "1.00x (no clear speed change)"),
    (0.98, "0.98x (no clear speed change)"),
])
def test_speed_words_have_a_noise_threshold(speedup, words):
    assert report_tables.speed_verdict(speedup) == words


def test_speed_noise_threshold_can_be_set():
    assert report_tables.speed_verdict(1.08, noise=0.1) == "1.08x (no clear speed change)"
    assert report_tables.speed_verdict(1.01, noise=0.0) == "1.01x (1% faster)"


# ---------------------------------------------------------------- a logged sweep, no training

ACCURACY = {("mixed_bfloat16", "32", "0"): 0.90, ("mixed_bfloat16", "32", "1"): 0.92, ("mixed_bfloat16", "32", "2"): 0.91,
            ("float8", "32", "0"): 0.89, ("float8", "32", "1"): 0.92, ("float8", "32", "2"): 0.90,
            ("mixed_bfloat16", "64", "0"): 0.93, ("mixed_bfloat16", "64", "1"): 0.94,
            ("float8", "64", "0"): 0.93, ("float8", "64", "1"): 0.95}


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_report_on_a_sweep_with_seeds(uri, tmp_path, capsys):
    runs = grid(ACCURACY, {"mixed_bfloat16": 10.0, "float8": 12.5})
    runs.append({"precision": "float8", "hidden": "64", "seed": "2", "status": "FAILED"})
    parent = log_sweep(uri, runs)
    assert make_report(uri, tmp_path / "out") == 0  # the latest sweep, by default

    table = read_csv(tmp_path / "out" / "report.csv")
    assert set(table) == {(p, h) for p in ("mixed_bfloat16", "float8") for h in ("32", "64")}
    row = table[("float8", "32")]
    assert row["seeds"] == "3"
    assert float(row["test_accuracy_mean"]) == pytest.approx(np.mean([0.89, 0.92, 0.90]))
    assert float(row["delta_accuracy"]) == pytest.approx(-0.02 / 3)
    expected = stats.ttest_rel([0.89, 0.92, 0.90], [0.90, 0.92, 0.91]).confidence_interval(0.95)
    assert (float(row["delta_ci_low"]), float(row["delta_ci_high"])) == pytest.approx((expected.low, expected.high))
    assert float(row["speedup"]) == pytest.approx(0.8)
    assert float(table[("float8", "64")]["speedup"]) == pytest.approx(0.8)
    assert table[("float8", "64")]["seeds"] == "2"  # the failed run is left out
    assert table[("mixed_bfloat16", "64")]["delta_accuracy"] == ""

    out = capsys.readouterr().out
    assert ("float8 h32: accuracy -0.67 pts vs mixed_bfloat16 [95% CI -2.10, +0.77] -> no clear accuracy change; "
            "0.80x (20% slower)") in out
    assert "-> too few seeds to decide (n=2); 0.80x (20% slower)" in out  # h64: two seeds
    assert table_row(out, "float8 h32")[4] == "-0.67 pts [-2.10, +0.77] (paired, n=3)"
    assert "Left out 1 run(s) that did not finish (1 FAILED): float8-h64-s2." in out
    assert "float8 is never faster than mixed_bfloat16 here" in out
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == REPORT_FILES | {"fp8_scales_float8_h32.png", "fp8_scales_float8_h64.png"}
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert logged == {f"report/{name}" for name in written}


def test_no_baseline_still_reports_and_says_so(uri, tmp_path, capsys):
    log_sweep(uri, [{"precision": "float8", "hidden": "32", "seed": "0", "test/accuracy": 0.9,
                     "perf/step_time_ms": 5.0, "fp8": False}])
    assert make_report(uri, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "No mixed_bfloat16 runs: accuracy deltas and speedups need the baseline" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == REPORT_FILES  # no FP8 metrics, no scale plot


def test_no_finished_runs_is_one_clear_line(uri, tmp_path, capsys):
    parent = log_sweep(uri, [{"precision": "float8", "hidden": "32", "seed": "0", "status": "FAILED"}])
    assert make_report(uri, tmp_path / "out", "--parent", parent) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fp8exp.report: error: sweep sweep has no finished runs (1 in all: 1 FAILED); nothing to compare")


@pytest.mark.parametrize("args,message", [
    ([], "no sweep in the store"),
    (["--parent", "0" * 32], "--parent: no run '00000000000000000000000000000000' in the store"),
    (["--experiment", "nope"], "no experiment named 'nope' in the store"),
])
def test_nothing_to_report_on(uri, tmp_path, capsys, args, message):
    MlflowClient(uri).search_experiments()  # an empty store
    assert make_report(uri, tmp_path / "out", *args) == 1
    assert message in capsys.readouterr().err


def test_missing_store_names_it(tmp_path, capsys):
    assert make_report(f"sqlite:///{tmp_path / 'none.db'}", tmp_path / "out") == 1
    assert "no MLflow store at sqlite:///" in capsys.readouterr().err


def test_experiment_mode_compares_runs_logged_one_by_one(uri, tmp_path):
    log_sweep(uri, grid({k: v for k, v in ACCURACY.items() if k[1] == "32"}, {"mixed_bfloat16": 10.0, "float8": 8.0}),
              experiment="by-hand")
    assert make_report(uri, tmp_path / "out", "--experiment", "by-hand") == 0
    assert float(read_csv(tmp_path / "out" / "report.csv")[("float8", "32")]["speedup"]) == pytest.approx(1.25)


def test_speed_noise_option_changes_the_speed_words(uri, tmp_path, capsys):
    log_sweep(uri, grid({k: v for k, v in ACCURACY.items() if k[1] == "32"}, {"mixed_bfloat16": 10.0, "float8": 8.0}))
    assert make_report(uri, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "; 1.25x (25% faster)" in out and "float8 is faster than mixed_bfloat16 at h32" in out
    assert make_report(uri, tmp_path / "out", "--speed-noise", "0.3") == 0
    out = capsys.readouterr().out
    assert "; 1.25x (no clear speed change)" in out and "float8 is never faster than mixed_bfloat16 here" in out
    assert float(read_csv(tmp_path / "out" / "report.csv")[("float8", "32")]["speedup"]) == pytest.approx(1.25)
    with pytest.raises(SystemExit):
        make_report(uri, tmp_path / "out", "--speed-noise", "-1")


def test_reruns_of_a_config_and_seed_count_once(uri, tmp_path, capsys):
    """The latest finished run of each configuration and seed counts; older ones are named in the notes."""
    def spec(precision, seed, accuracy, start, **extra):
        return {"precision": precision, "hidden": "32", "seed": seed, "test/accuracy": accuracy,
                "perf/step_time_ms": 10.0, "start": start, **extra}

    base = [spec("mixed_bfloat16", s, a, 1000 + s) for s, a in enumerate((0.90, 0.92, 0.91))]
    latest = [spec("float8", s, a, 5000 + s) for s, a in enumerate((0.95, 0.96, 0.97))]
    stale = [spec("float8", s, 0.80, 2000 + s) for s in range(3)]
    failed = spec("float8", 0, 0.10, 9000, status="FAILED")  # a newer run that failed replaces nothing
    log_sweep(uri, base + latest + stale + [failed], experiment="by-hand")
    assert make_report(uri, tmp_path / "out", "--experiment", "by-hand") == 0

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("by-hand").experiment_id], "params.`precision.name` = 'float8'")
    row = read_csv(tmp_path / "out" / "report.csv")[("float8", "32")]
    assert row["seeds"] == "3"
    assert set(row["run_ids"].split()) == {r.info.run_id for r in runs if 5000 <= r.info.start_time < 9000}
    assert set(row["superseded_run_ids"].split()) == {r.info.run_id for r in runs if r.info.start_time < 5000}
    assert float(row["test_accuracy_mean"]) == pytest.approx(0.96)
    assert float(row["delta_accuracy"]) == pytest.approx(0.05)
    out = capsys.readouterr().out
    assert "float8 h32: accuracy +5.00 pts vs mixed_bfloat16" in out and "-> gained accuracy" in out
    assert table_row(out, "float8 h32")[2] == "3 (6 runs)"
    assert "Left out 3 run(s) superseded by a later finished run of the same configuration and seed" in out


def test_unmatched_seeds_are_named_in_the_notes(uri, tmp_path, capsys):
    accuracy = {**{k: v for k, v in ACCURACY.items() if k[1] == "32"}, ("float8", "32", "3"): 0.5,
                ("mixed_bfloat16", "64", "5"): 0.93, ("mixed_bfloat16", "64", "6"): 0.94,
                ("float8", "64", "0"): 0.93, ("float8", "64", "1"): 0.95}
    log_sweep(uri, grid(accuracy, {"mixed_bfloat16": 10.0, "float8": 10.0}))
    assert make_report(uri, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "float8 h32: seed 3 has no mixed_bfloat16 run; compared on seeds 0, 1, 2." in out
    assert table_row(out, "float8 h32")[4] == "-0.67 pts [-2.10, +0.77] (paired, n=3)"
    assert ("float8 h64: seeds 0, 1 have no mixed_bfloat16 run; mixed_bfloat16 seeds 5, 6 have no float8 run; "
            "fewer than 2 seeds in common: compared unpaired (Welch)") in out
    assert table_row(out, "float8 h64")[4].endswith("(unpaired, n=2 vs 2)")
    table = read_csv(tmp_path / "out" / "report.csv")
    assert (table[("float8", "32")]["delta_n"], table[("float8", "32")]["delta_paired"]) == ("3", "True")


# ---------------------------------------------------------------- the answer on the parent run


def expected_summary(table: dict[tuple[str, str], dict[str, str]]) -> dict[str, float]:
    """The parent's summary metrics as the CSV has them (Δ and its interval in points there)."""
    expected = {}
    for (precision, hidden), row in table.items():
        group = f"summary/{precision}-h{hidden}/"
        for name, column, scale in (("test_accuracy_mean", "test_accuracy_mean", 1),
                                    ("delta_pts", "delta_accuracy", 100), ("delta_ci_low", "delta_ci_low", 100),
                                    ("delta_ci_high", "delta_ci_high", 100), ("speedup", "speedup", 1),
                                    ("step_time_ms", "step_time_ms_median", 1)):
            if row[column]:
                expected[group + name] = float(row[column]) * scale
    return expected


def test_the_parent_run_carries_the_answer(uri, tmp_path, capsys):
    """Summary metrics per configuration, the verdict tag and the report as the run's description."""
    parent = log_sweep(uri, grid(ACCURACY, {"mixed_bfloat16": 10.0, "float8": 12.5}))
    assert make_report(uri, tmp_path / "out") == 0
    out = capsys.readouterr().out
    client = MlflowClient(uri)
    run = client.get_run(parent)

    table = read_csv(tmp_path / "out" / "report.csv")
    summary = {key: value for key, value in run.data.metrics.items() if key.startswith("summary/")}
    assert summary == pytest.approx(expected_summary(table))
    assert summary["summary/float8-h32/delta_pts"] == pytest.approx(-2 / 3)
    expected = stats.ttest_rel([0.89, 0.92, 0.90], [0.90, 0.92, 0.91]).confidence_interval(0.95)
    assert (summary["summary/float8-h32/delta_ci_low"], summary["summary/float8-h32/delta_ci_high"]) == \
        pytest.approx((expected.low * 100, expected.high * 100))
    assert summary["summary/float8-h64/speedup"] == pytest.approx(0.8)
    assert summary["summary/mixed_bfloat16-h32/test_accuracy_mean"] == pytest.approx(0.91)
    assert not any(key.startswith("summary/mixed_bfloat16-h32/delta") for key in summary)  # the baseline
    assert "summary/mixed_bfloat16-h32/speedup" not in summary

    headline = [line[2:] for line in out.splitlines() if line.startswith("- float8 h")]
    verdict = run.data.tags["fp8exp.verdict"]
    assert verdict == " | ".join(headline + ["float8 is never faster than mixed_bfloat16 here"])
    assert verdict.startswith("float8 h32: accuracy -0.67 pts vs mixed_bfloat16 [95% CI -2.10, +0.77]")

    note = run.data.tags["mlflow.note.content"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert note.split("\n![", 1)[0] == markdown.split("\n![", 1)[0]  # title, headline, table, notes
    assert table_row(note, "float8 h32")[4] == "-0.67 pts [-2.10, +0.77] (paired, n=3)"
    images = re.findall(r"!\[[^\]]*\]\(get-artifact\?path=(\S+)&run_uuid=(\w+)\)", note)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {path for path, _ in images} == {f"report/{p.name}" for p in (tmp_path / "out").glob("*.png")} <= logged
    assert {run_id for _, run_id in images} == {parent}


def test_a_parent_in_the_offline_store_gets_the_answer_but_no_plot_links(uri, tmp_path):
    """Synced later, its server copy may get another run id: links to its artifacts would break."""
    parent = log_sweep(uri, grid(ACCURACY, {"mixed_bfloat16": 10.0, "float8": 12.5}))
    MlflowClient(uri).set_tag(parent, "fp8exp.sync.status", "pending")
    assert make_report(uri, tmp_path / "out", "--parent", parent) == 0
    run = MlflowClient(uri).get_run(parent)
    assert "| float8 " in run.data.tags["mlflow.note.content"] and "![" not in run.data.tags["mlflow.note.content"]
    assert run.data.tags["fp8exp.verdict"].startswith("float8 h32: ")
    assert "summary/float8-h32/delta_pts" in run.data.metrics
    assert {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")} >= {"report/accuracy.png"}


def test_metric_keys_are_valid_mlflow_keys_for_any_label():
    from mlflow.utils.validation import _validate_metric_name

    row = Row("float8 (amax_history_length=16)", (("model.hidden_dim", "32"), ("trainer.learning_rate", "1e-3")))
    assert report_parent.metric_label(row) == "float8-amax_history_length-16-h32-learning_rate-1e-3"
    assert report_parent.metric_label(Row("float8", ())) == "float8-all"
    for key in report_parent.summary_metrics([row]):
        _validate_metric_name(key)


def run_data(precision: str, hidden: int, accuracy: float, step_ms: float) -> RunData:
    return RunData(f"{precision}{hidden}", f"{precision}-h{hidden}", "FINISHED",
                   {"precision.name": precision, "model.hidden_dim": str(hidden), "trainer.seed": "0"},
                   {"test/accuracy": accuracy, "perf/step_time_ms": step_ms})


def test_a_long_verdict_keeps_whole_lines_and_the_crossover():
    rows = build_rows([run_data(p, 2 ** k, 0.9, 10.0 if p == "float8" and k > 10 else 12.0)
                       for k in range(5, 15) for p in ("mixed_bfloat16", "float8")])
    verdict = report_parent.verdict(rows)
    assert len(verdict) <= report_parent.MAX_VERDICT_CHARS and "\n" not in verdict
    lines = verdict.split(" | ")
    assert lines[0].startswith("float8 h32: accuracy +0.00 pts vs mixed_bfloat16 (one seed: no CI)")
    assert re.fullmatch(r"\+\d+ more in the run's description", lines[-2])
    assert int(lines[-2].split()[0]) == 10 - (len(lines) - 2)
    assert lines[-1] == "float8 is faster than mixed_bfloat16 at h2048, h4096, h8192, h16384"
    assert report_parent.verdict(rows[:2]) == ("float8 h32: accuracy +0.00 pts vs mixed_bfloat16 (one seed: no CI); "
                                               "1.00x (no clear speed change) | "
                                               "float8 is never faster than mixed_bfloat16 here")
    assert report_parent.verdict(rows[:1]) == "only mixed_bfloat16 runs: nothing to compare"
    assert report_parent.verdict(build_rows([run_data("float8", 32, 0.9, 10.0)])) == \
        "no mixed_bfloat16 runs: nothing to compare against"
    unmatched = build_rows([run_data("float8", 32, 0.9, 10.0), run_data("mixed_bfloat16", 64, 0.9, 10.0)])
    assert report_parent.verdict(unmatched) == "nothing to compare: no mixed_bfloat16 run at the same setting"


def test_a_long_note_is_cut_at_a_line_and_says_so():
    rows = "".join(f"| row {i} | {'x' * 90} |\n" for i in range(200))
    markdown = f"# FP8 report\n\n{rows}\n![accuracy](accuracy.png)\n"
    note = report_parent.note(markdown, "abc", {"accuracy.png"})
    assert len(note) <= report_parent.MAX_NOTE_CHARS
    assert note.rstrip().endswith("the whole report is `report/report.md`.*")
    assert all(line.endswith("|") for line in note.split("\n")[2:-3] if line)
    short = report_parent.note("# r\n\n![accuracy](accuracy.png)\n\n![step time](step_time.png)\n", "abc",
                               {"accuracy.png"})
    assert short == "# r\n\n![accuracy](get-artifact?path=report/accuracy.png&run_uuid=abc)\n"


# ---------------------------------------------------------------- the real sweep


@pytest.mark.slow
def test_report_on_a_real_sweep_matches_its_runs(tmp_path_factory, capsys):
    sweep = basic_sweep(tmp_path_factory)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    [parent] = sweep.parents()
    children = {c.info.run_name: c.data.metrics for c in sweep.children(parent.info.run_id)}
    uri = f"sqlite:///{sweep.cwd / 'mlflow.db'}"
    assert report_main(["--tracking-uri", uri, "--parent", parent.info.run_id]) == 0

    out = Path(parent.data.tags["sweep.dir"]) / "report"
    table = read_csv(out / "report.csv")
    for (precision, hidden), row in table.items():
        metrics = children[f"{precision}-h{hidden}"]
        assert float(row["test_accuracy_mean"]) == pytest.approx(metrics["test/accuracy"])
        assert float(row["step_time_ms_median"]) == pytest.approx(metrics["perf/step_time_ms"])
        assert float(row["params"]) == metrics["model/params"]
        if precision == "float8":
            base = children[f"mixed_bfloat16-h{hidden}"]
            assert float(row["delta_accuracy"]) == pytest.approx(metrics["test/accuracy"] - base["test/accuracy"])
            assert float(row["speedup"]) == pytest.approx(base["perf/step_time_ms"] / metrics["perf/step_time_ms"])
            assert math.isfinite(float(row["examples_per_s_median"]))
    assert {p.name for p in out.iterdir()} == REPORT_FILES | {"fp8_scales_float8_h32.png", "fp8_scales_float8_h64.png"}
    assert "| float8 " in capsys.readouterr().out
    assert len(MlflowClient(uri).list_artifacts(parent.info.run_id, "report")) == 6
