"""The report's FP8 recipe ranking (fp8exp/report/recipes.py) on hand-made runs with known values:
the order, the deltas and intervals against BF16 and against the top recipe, the step-time cost
against delayed, diverged and unfinished recipes, and the section in a real report on an MLflow
store; and the sweep presets that produce such runs."""

from __future__ import annotations

import math

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from fp8exp.report import parity
from fp8exp.report import recipes as report_recipes
from fp8exp.report.__main__ import main as report_main
from fp8exp.report.rows import attach_diverged, build_rows
from fp8exp.report.runs import RunData
from tests.conftest import compose_config

BF16 = "mixed_bfloat16"
SEEDS = ("0", "1", "2")
T = stats.t.ppf(0.975, 2)
BASE_ACCURACY = (0.90, 0.91, 0.92)
# Accuracy differences to BF16 per seed, and median step ms: current gains, rowwise ties with it,
# delayed is level, block loses.
CLASSIFY = {"current": ((0.010, 0.012, 0.008), 24.0), "rowwise": ((0.010, 0.011, 0.009), 26.0),
            "delayed": ((0.000, 0.001, -0.001), 20.0), "block": ((-0.020, -0.021, -0.019), 30.0)}


def params(precision: str, recipe: str | None, seed: str, task: str = "classify") -> dict[str, str]:
    return {"precision.name": precision, "precision.recipe": recipe or "null", "trainer.seed": seed,
            "model.hidden_dim": "32", "model.size": "tiny", "task.name": task}


def classify_runs() -> list[RunData]:
    runs = [RunData(f"b{s}", f"bf16-s{s}", "FINISHED", params(BF16, None, s),
                    {"test/accuracy": BASE_ACCURACY[i], "perf/step_time_ms": 10.0}, "cpu:cpu x1")
            for i, s in enumerate(SEEDS)]
    for recipe, (deltas, step) in CLASSIFY.items():
        runs += [RunData(f"{recipe}{s}", f"{recipe}-s{s}", "FINISHED", params("float8", recipe, s),
                         {"test/accuracy": BASE_ACCURACY[i] + deltas[i], "perf/step_time_ms": step}, "cpu:cpu x1")
                 for i, s in enumerate(SEEDS)]
    return runs


def ranked_of(runs: list[RunData], left_out=()):
    rows = build_rows(runs)
    attach_diverged(rows, list(left_out))
    return rows, report_recipes.rankings(rows, parity.loss_parity(rows))


def half_width(values) -> float:
    values = list(values)
    return T * stats.tstd(values) / math.sqrt(len(values))


def test_classifier_recipes_rank_by_accuracy_delta_with_paired_intervals():
    rows, [(setting, ranked)] = ranked_of(classify_runs())
    assert setting == "h32"
    assert [item.recipe for item in ranked] == ["current", "rowwise", "delayed", "block"]
    top, tie, level, lost = ranked
    assert top.mean == pytest.approx(0.010)
    assert (top.low, top.high) == pytest.approx((0.010 - half_width((0.010, 0.012, 0.008)),
                                                 0.010 + half_width((0.010, 0.012, 0.008))))
    assert lost.verdict == "LOST accuracy" and top.verdict == "gained accuracy"
    # Against the top recipe, paired by seed: rowwise - current = (0, -0.001, +0.001): tied.
    mean, low, high, n = tie.to_top
    assert (mean, n) == (pytest.approx(0.0, abs=1e-12), 3)
    assert low < 0 < high and (high - low) / 2 == pytest.approx(half_width((0.0, -0.001, 0.001)))
    assert level.to_top[0] == pytest.approx(-0.010) and level.to_top[2] < 0  # delayed is worse than current
    assert top.to_top is None
    assert [item.cost for item in ranked] == pytest.approx([24 / 20, 26 / 20, 1.0, 30 / 20])
    assert [item.row.speedup for item in ranked] == pytest.approx([10 / 24, 10 / 26, 10 / 20, 10 / 30])

    section = "\n".join(report_recipes.markdown_section(rows, parity.loss_parity(rows)))
    lines = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in section.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert lines["rowwise"][5].endswith(": tied") and lines["delayed"][5].endswith(": worse")
    assert lines["current"][5] == "top" and lines["block"][7] == "1.50x" and lines["current"][8] == "0.42x"
    assert "emulation" in section and "gpu_kit --recipes" in section and "Tiny models" in section


def test_language_model_recipes_rank_by_relative_loss_error():
    losses = {"delayed": (2.004, 2.004, 2.004), "current": (2.000, 2.001, 2.002), "mxfp8": (2.02, 2.03, 2.04)}
    runs = [RunData(f"b{s}", f"b{s}", "FINISHED", params(BF16, None, s, "causal_lm"),
                    {"val/loss": 2.0, "test/accuracy": 0.2, "perf/step_time_ms": 10.0}) for s in SEEDS]
    runs += [RunData(f"{r}{s}", f"{r}{s}", "FINISHED", params("float8", r, s, "causal_lm"),
                     {"val/loss": values[i], "test/accuracy": 0.2, "perf/step_time_ms": 12.0})
             for r, values in losses.items() for i, s in enumerate(SEEDS)]
    _, [(_, ranked)] = ranked_of(runs)
    assert [item.recipe for item in ranked] == ["current", "delayed", "mxfp8"]
    assert ranked[0].mean == pytest.approx(0.0005) and ranked[0].verdict == parity.PARITY
    assert ranked[1].mean == pytest.approx(0.002)  # the same on every seed: no interval
    assert ranked[2].verdict == parity.WORSE
    per_seed = [b / a - 1 for a, b in zip((2.000, 2.001, 2.002), (2.02, 2.03, 2.04))]  # mxfp8 / current - 1
    assert ranked[2].to_top[:3] == pytest.approx((sum(per_seed) / 3, sum(per_seed) / 3 - half_width(per_seed),
                                                  sum(per_seed) / 3 + half_width(per_seed)))


def test_a_diverged_recipe_ranks_last_and_an_unfinished_one_is_named():
    runs = classify_runs()
    mxfp8 = [RunData(f"m{s}", f"m{s}", "FINISHED", params("float8", "mxfp8", s),
                     {"test/accuracy": 0.99, "perf/step_time_ms": 25.0}) for s in ("1", "2")]
    diverged = RunData("m0", "m0", "FAILED", params("float8", "mxfp8", "0"), {}, failure="non_finite")
    killed = RunData("g0", "g0", "KILLED", params("float8", "rowwise_gw_hp", "0"), {})
    rows, [(_, ranked)] = ranked_of(runs + mxfp8, [diverged, killed])
    assert ranked[-1].recipe == "mxfp8" and ranked[-1].verdict == "worse: diverged (non-finite) on seed 0"
    section = "\n".join(report_recipes.markdown_section(rows, parity.loss_parity(rows), [diverged, killed]))
    assert "rowwise_gw_hp: no finished run to rank (seed 0 KILLED)." in section


def test_one_recipe_alone_is_not_ranked():
    runs = [run for run in classify_runs() if run.params["precision.recipe"] in ("null", "delayed")]
    rows, found = ranked_of(runs)
    assert found == [] and report_recipes.markdown_section(rows, []) == []


def test_the_report_on_a_store_has_the_ranking(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("fp8exp", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="fp8_recipes", tags={"sweep.jobs": "15"}).info.run_id
    for run in classify_runs():
        run_id = client.create_run(experiment, run_name=run.name, tags={"mlflow.parentRunId": parent,
                                                                       "device": run.device}).info.run_id
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in run.metrics.items()],
                         params=[Param(k, v) for k, v in run.params.items()])
        client.set_terminated(run_id)
    client.set_terminated(parent)
    assert report_main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    section = markdown.split("## FP8 recipes ranked", 1)[1]
    assert section.index("| 1    | current") < section.index("| 4    | block")
    assert "float8 (recipe=current)" in markdown  # the main table tells the recipes apart too


@pytest.mark.parametrize("sweep,task,model", [("fp8_recipes", "classify", "tiny"),
                                              ("fp8_recipes_lm", "causal_lm", "llama_tiny")])
def test_the_recipe_sweeps_cover_every_recipe_and_the_baseline(sweep, task, model):
    from fp8exp.config.precision import FP8_RECIPES
    from tests.conftest import CONF

    text = (CONF / "sweep" / f"{sweep}.yaml").read_text()
    [line] = [line for line in text.splitlines() if line.strip().startswith("precision:")]
    choices = line.split(":", 1)[1].strip().split(",")
    recipes = {compose_config(f"precision={choice}").precision.get("recipe") for choice in choices}
    assert BF16 in choices and recipes - {None} == set(FP8_RECIPES)
    cfg = compose_config(f"+sweep={sweep}", f"precision={choices[-1]}", *(["model=llama_tiny"] if model != "tiny" else []))
    assert (cfg.task.name, cfg.data.name) == (task, "table")


def test_runs_logged_before_the_recipe_key_count_as_delayed_and_names_say_the_recipe():
    from fp8exp.run.launch import run_name

    runs = classify_runs()
    for run in runs:  # float8 delayed runs from before precision.recipe existed; one null-logged
        if run.params["precision.recipe"] == "delayed":
            del run.params["precision.recipe"]
    killed = RunData("k", "k", "KILLED", {**params("float8", "null", "3")}, {})
    rows, [(_, ranked)] = ranked_of(runs)
    assert {item.recipe for item in ranked} == {"current", "rowwise", "delayed", "block"}
    section = "\n".join(report_recipes.markdown_section(rows, parity.loss_parity(rows), [killed]))
    assert "no finished run" not in section  # the killed null-recipe run is delayed, which is ranked
    names = {choice: run_name(compose_config(f"precision={choice}"), [f"precision={choice}", "trainer.seed=0"])
             for choice in ("float8", "float8_block", BF16)}
    assert names == {"float8": "float8-h32-s0", "float8_block": "float8_block-h32-s0", BF16: f"{BF16}-h32-s0"}


def test_identical_differences_to_the_top_read_tied_and_total_divergence_is_said():
    runs = [run for run in classify_runs() if run.params["precision.recipe"] in ("null", "current")]
    runs += [RunData(f"r{s}", f"r{s}", "FINISHED", params("float8", "rowwise", s),
                     {"test/accuracy": next(r.metrics["test/accuracy"] for r in runs
                                            if r.run_id == f"current{s}"), "perf/step_time_ms": 26.0}) for s in SEEDS]
    diverged = [RunData(f"m{s}", f"m{s}", "FAILED", params("float8", "mxfp8", s), {}, failure="non_finite") for s in SEEDS]
    rows, _ = ranked_of(runs, diverged)
    section = "\n".join(report_recipes.markdown_section(rows, parity.loss_parity(rows), diverged))
    assert "+0.00 pts: identical on every seed, tied" in section
    assert "mxfp8: **diverged (non-finite) on every seed it ran**" in section
