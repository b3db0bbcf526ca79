"""FP8 recipes side by side: when a sweep trains float8 with two or more recipes (precision.recipe)
at one setting, rank them by what they cost against mixed_bfloat16 and say what each costs to run.

- Classifiers rank by the accuracy delta (rows.build_rows, highest first); language models by the
  relative final validation loss error (parity.loss_parity, lowest first). Each with its 95% CI.
- "vs the top recipe": the same difference taken against the top-ranked recipe, paired by seed. A
  recipe whose interval there includes zero is not distinguishable from the top one on these
  seeds: the ranking between them is noise.
- Step-time cost against `delayed` (Keras' own recipe) and against BF16. On a CPU every recipe is
  an emulation, so that is the emulation's cost, not FP8 speed; `fp8.gemm` says what ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8exp.report.parity import Parity, is_lm, percent
from fp8exp.report.rows import UNSET, Row
from fp8exp.report.runs import BASELINE, PRECISION, STEP_MS
from fp8exp.report.stats import MIN_SEEDS, SAME, mean_ci, seed_order
from fp8exp.report.tables import points

RECIPE = "precision.recipe"
DELAYED = "delayed"
GPU_NOTE = ("GPU speed needs an FP8 GPU: `python -m benchmarks.gpu_kit --recipes` times each recipe against BF16 "
            "at hidden 4096 and 8192 and says whether its GEMMs ran in FP8.")


def recipe_in(params: dict[str, str]) -> str | None:
    """A run's FP8 recipe (`delayed` when float8 names none); None for other precisions."""
    if params.get(PRECISION) != "float8":
        return None
    return DELAYED if params.get(RECIPE) in UNSET else params[RECIPE]


def recipe_of(row: Row) -> str | None:
    return recipe_in(row.runs[0].params) if row.runs else None


@dataclass
class Ranked:
    """One recipe at one setting, in ranking order."""

    recipe: str
    row: Row
    mean: float | None
    """Accuracy delta (fraction) or relative loss error vs BF16; None when not comparable."""
    low: float | None = None
    high: float | None = None
    verdict: str = ""
    to_top: tuple[float, float | None, float | None, int] | None = None
    """(mean, low, high, seeds) of the paired difference to the top recipe (None for the top itself)."""
    cost: float | None = None
    """Median step time / delayed's median step time."""


def _paired(mine: dict[str, float], top: dict[str, float], lm: bool) -> tuple | None:
    """(mean, low, high, seeds) of the difference to the top recipe on the seeds both ran: the loss
    ratio - 1 (language models) or the accuracy difference; None from fewer than two seeds."""
    common = sorted(set(mine) & set(top), key=seed_order)
    if len(common) < 2:
        return None
    differences = [mine[s] / top[s] - 1 if lm else mine[s] - top[s] for s in common]
    return (*mean_ci(differences), len(common))


def rankings(rows: list[Row], parities: list[Parity]) -> list[tuple[str, list[Ranked]]]:
    """(setting label, recipes ranked best first) for every setting with two or more FP8 recipes."""
    by_row = {id(p.row): p for p in parities}
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        if recipe_of(row) is not None and row.runs:
            groups.setdefault(row.setting, []).append(row)
    found = []
    for group in groups.values():
        if len({recipe_of(row) for row in group}) < 2:
            continue
        lm = all(is_lm(row) for row in group)
        ranked = []
        for row in group:
            if lm and id(row) in by_row:
                p = by_row[id(row)]
                ranked.append(Ranked(recipe_of(row), row, p.mean, p.low, p.high, p.verdict))
            elif not lm and row.delta is not None:
                d = row.delta
                ranked.append(Ranked(recipe_of(row), row, d.mean, d.low, d.high, d.verdict))
            else:
                ranked.append(Ranked(recipe_of(row), row, None, verdict=f"no {BASELINE} run to compare"))
        for item in ranked:
            if item.row.diverged and "diverged" not in item.verdict:
                seeds = ", ".join(sorted({run.seed for run in item.row.diverged}, key=seed_order))
                item.verdict = f"worse: diverged (non-finite) on seed {seeds}"
        sign = 1 if lm else -1  # lower loss error first; higher accuracy first; a diverged seed last
        ranked.sort(key=lambda r: (bool(r.row.diverged), r.mean is None, sign * (r.mean or 0), r.recipe))
        key = "val/loss" if lm else "test/accuracy"
        delayed = next((r.row.median(STEP_MS) for r in ranked if r.recipe == DELAYED), None)
        for item in ranked:
            step = item.row.median(STEP_MS)
            item.cost = step / delayed if step and delayed else None
            if item is not ranked[0] and ranked[0].mean is not None:
                item.to_top = _paired(item.row.metric(key), ranked[0].row.metric(key), lm)
        found.append((group[0].size_label, ranked))
    return found


def _difference(mean: float | None, low: float | None, high: float | None, lm: bool) -> str:
    if mean is None:
        return "–"
    if lm:
        return percent(mean) + (f" [{percent(low)}, {percent(high)}]" if low is not None else "")
    return f"{points(mean)} pts" + (f" [{points(low)}, {points(high)}]" if low is not None else "")


def _to_top(item: Ranked, lm: bool, top: bool) -> str:
    if top or item.to_top is None:
        return "top" if top and item.mean is not None else "–"
    mean, low, high, seeds = item.to_top
    if seeds < MIN_SEEDS:
        return _difference(mean, low, high, lm) + f" (n={seeds}: no verdict)"
    if low is None:  # the same difference on every seed: no spread for an interval
        return _difference(mean, None, None, lm) + (": identical on every seed, tied" if abs(mean) <= SAME
                                                    else ": no variance across seeds, CI undefined")
    worse = mean > 0 if lm else mean < 0
    return _difference(mean, low, high, lm) + (": tied" if low <= 0 <= high else ": worse" if worse else ": better")


def unfinished(found: list[tuple[str, list[Ranked]]], left_out) -> list[str]:
    """Notes on recipes the sweep ran that have no finished run at all (so no row to rank)."""
    ranked = {item.recipe for _, items in found for item in items}
    missing: dict[str, list] = {}
    for run in left_out:
        recipe = recipe_in(run.params)
        if recipe is not None and recipe not in ranked:
            missing.setdefault(recipe, []).append(run)

    def note(recipe: str, runs: list) -> str:
        seeds = ", ".join(f"seed {run.seed} {run.status}" + (f" ({run.failure})" if run.failure else "") for run in runs)
        if all(run.failure == "non_finite" for run in runs):  # the strongest evidence against it
            return f"{recipe}: **diverged (non-finite) on every seed it ran** ({seeds}): worse than every recipe ranked."
        return f"{recipe}: no finished run to rank ({seeds})."

    return [note(recipe, runs) for recipe, runs in sorted(missing.items())]


def markdown_section(rows: list[Row], parities: list[Parity], left_out=()) -> list[str]:
    """"## FP8 recipes ranked" with one table per setting that trained two or more recipes;
    `left_out`: the runs that did not finish, for the recipes that have none that did."""
    found = rankings(rows, parities)
    if not found:
        return []
    cpu = any(run.device.startswith("cpu") for row in rows for run in row.runs)
    lines = ["## FP8 recipes ranked", ""]
    for setting, ranked in found:
        lm = all(is_lm(item.row) for item in ranked)
        what = f"relative loss error vs {BASELINE}" if lm else f"Δ accuracy vs {BASELINE}"
        header = ["rank", "recipe", "seeds", f"{what} [95% CI]", "verdict", "vs the top recipe [95% CI]",
                  "step ms", "cost vs delayed", f"speed vs {BASELINE}"]
        table = [header]
        for rank, item in enumerate(ranked, 1):
            step = item.row.median(STEP_MS)
            name = item.recipe if [i.recipe for i in ranked].count(item.recipe) == 1 else item.row.precision
            table.append([str(rank), name, str(len(item.row.runs)),
                          _difference(item.mean, item.low, item.high, lm), item.verdict, _to_top(item, lm, rank == 1),
                          f"{step:.2f}" if step else "–", f"{item.cost:.2f}x" if item.cost else "–",
                          f"{item.row.speedup:.2f}x" if item.row.speedup else "–"])
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        body = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
        body.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines += [f"### {setting}", "", *body, ""]
    notes = unfinished(found, left_out) + [("Ranked by the difference to the baseline, best first; \"vs the top recipe\" is the same difference "
              "taken against the top-ranked recipe, paired by seed: **tied** when its 95% interval includes zero, so "
              "the order between those recipes is noise on these seeds. Cost = median step time / delayed's.")]
    notes.append(("Step times were measured on a CPU, where every recipe is an emulation (quantize-dequantize "
                  "around bfloat16 matmuls): the cost column is the emulation's cost, not FP8 speed. " if cpu else "")
                 + GPU_NOTE)
    if any(item.row.runs and item.row.runs[0].params.get("model.size") == "tiny" for _, r in found for item in r):
        notes.append("Tiny models are toys: a recipe's rank here says little about it at scale.")
    return lines + [f"> {n}" for n in notes] + [""]
