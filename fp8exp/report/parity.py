"""Loss parity for language models (`task=causal_lm` runs): does FP8 train to the loss BF16 does?

Each configuration of another precision is paired with the mixed_bfloat16 one at the same setting,
seed by seed (the same seed gives both the same initialisation and data order). Per seed both ran,
the relative loss error is `loss_fp8 / loss_bf16 - 1` of the final validation loss: each run's last
`val/loss`, the one logged after its last epoch (`val/loss_step`, the validation loss every
`trainer.eval_every_steps` steps, only draws the curves). Over the seeds: the mean with a t-based
95% interval on the paired per-seed values (stats.mean_ci, as the accuracy deltas). The verdict
against `threshold` (`--parity-threshold`, 0.25% by default after DeepSeek-V3, which reports a
relative loss error below 0.25% for FP8 against BF16):

- "parity": the whole interval lies below +threshold (an FP8 loss lower than BF16's is parity too);
- "worse": the whole interval lies above +threshold;
- "undecided: CI too wide": the interval straddles +threshold;
- from fewer than MIN_SEEDS seeds in common: no interval and no verdict, and the words say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fp8exp.report.rows import Row
from fp8exp.report.runs import BASELINE, VAL_LOSS
from fp8exp.report.stats import MIN_SEEDS, SAME, mean_ci, seed_order
from fp8exp.report.tables import SPEED_NOISE, headline, speed_verdict

PARITY_THRESHOLD = 0.0025
"""DeepSeek-V3: FP8 training stays within 0.25% relative loss error of BF16."""
TASK, LM_TASK = "task.name", "causal_lm"
PARITY, WORSE, UNDECIDED = "parity", "worse", "undecided: CI too wide"
CSV_COLUMNS = ["val_loss_mean", "val_loss_sd", "rel_loss_error", "rel_loss_error_ci_low", "rel_loss_error_ci_high",
               "rel_loss_error_n", "parity_verdict"]


def is_lm(row: Row) -> bool:
    return bool(row.runs) and all(run.params.get(TASK) == LM_TASK for run in row.runs)


def model_name(row: Row) -> str:
    """What the runs' `model` tag says, from their params: `llama_tiny`, or `tiny` for the classifier."""
    params = row.runs[0].params
    family, size = params.get("model.family", ""), params.get("model.size", "")
    return size if family in ("", "classifier") else f"{family}_{size}" if size else family


def is_tiny(row: Row) -> bool:
    return any(run.params.get("model.size") == "tiny" for run in row.runs)


def percent(x: float) -> str:
    """A relative error as a signed percentage: 0.0012 -> "+0.120%"."""
    return f"{x * 100:+.3f}%"


@dataclass
class Parity:
    """One configuration's final validation loss against mixed_bfloat16's, paired by seed."""

    row: Row
    base: Row
    errors: dict[str, float]
    """Seed -> loss / baseline loss - 1, on the seeds both ran, in seed order."""
    threshold: float
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    only_here: tuple[str, ...] = ()
    only_baseline: tuple[str, ...] = ()
    diverged: tuple[str, ...] = ()
    """Seeds on which this configuration's run failed with a non-finite loss or FP8 scale: the
    strongest evidence against parity, whatever the surviving seeds say."""

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def verdict(self) -> str:
        if self.diverged:
            return f"{WORSE}: diverged (non-finite) on seed {', '.join(self.diverged)}"
        if not self.errors:
            return f"no seed in common with {BASELINE}: nothing to pair"
        if self.n < MIN_SEEDS:
            return f"too few seeds for a CI (n={self.n}, needs {MIN_SEEDS}): no verdict"
        if self.low is None:
            return f"{PARITY} (identical on every seed)" if abs(self.mean) <= SAME else \
                "no variance across seeds: CI undefined"
        if self.high < self.threshold:
            return PARITY
        if self.low > self.threshold:
            return WORSE
        return UNDECIDED

    @property
    def interval(self) -> str:
        return f"[{percent(self.low)}, {percent(self.high)}]" if self.low is not None else ""


def loss_parity(rows: list[Row], threshold: float = PARITY_THRESHOLD) -> list[Parity]:
    """A Parity for every causal_lm configuration with a mixed_bfloat16 one at its setting; a
    row's runs that diverged (Row.diverged) decide its verdict."""
    lm = [row for row in rows if is_lm(row)]
    baselines = {row.setting: row for row in lm if row.precision == BASELINE}
    found = []
    for row in lm:
        base = baselines.get(row.setting)
        if base is None or row is base:
            continue
        mine, theirs = row.metric(VAL_LOSS), base.metric(VAL_LOSS)
        common = sorted(set(mine) & set(theirs), key=seed_order)
        parity = Parity(row, base, {s: mine[s] / theirs[s] - 1 for s in common}, threshold,
                        only_here=tuple(sorted(set(mine) - set(theirs), key=seed_order)),
                        only_baseline=tuple(sorted(set(theirs) - set(mine), key=seed_order)),
                        diverged=tuple(sorted({run.seed for run in row.diverged}, key=seed_order)))
        if parity.errors:
            parity.mean = float(np.mean(list(parity.errors.values())))
            if parity.n >= MIN_SEEDS:
                parity.mean, parity.low, parity.high = mean_ci(list(parity.errors.values()))
        found.append(parity)
    return found


def parity_line(parity: Parity, noise: float = SPEED_NOISE) -> str:
    """The headline of one pairing, e.g. "float8 h64: final val loss +0.200% vs mixed_bfloat16
    [95% CI -0.048%, +0.448%] -> undecided: CI too wide (threshold 0.25%); 0.80x (20% slower)"."""
    speed = speed_verdict(parity.row.speedup, noise) or "no step time"
    if parity.mean is None:
        return f"{parity.row.label}: final val loss: {parity.verdict}; {speed}"
    interval = f" [95% CI {parity.interval[1:-1]}]" if parity.low is not None else ""
    return (f"{parity.row.label}: final val loss {percent(parity.mean)} vs {BASELINE}{interval} -> {parity.verdict} "
            f"(threshold {parity.threshold * 100:.2f}%); {speed}")


def answer_lines(rows: list[Row], noise: float = SPEED_NOISE, threshold: float = PARITY_THRESHOLD) -> list[str]:
    """The report's answer, one line per compared configuration in table order: loss parity for
    language models, the accuracy headline (tables.headline) for the others."""
    parities = {p.row.label: p for p in loss_parity(rows, threshold)}
    lines = []
    for row in rows:
        lines += [parity_line(parities[row.label], noise)] if row.label in parities else headline([row], noise)
    return lines


def _loss_cells(row: Row) -> tuple[float | None, float | None]:
    losses = list(row.metric(VAL_LOSS).values())
    return (float(np.mean(losses)) if losses else None), (float(np.std(losses, ddof=1)) if len(losses) > 1 else None)


def _label(row: Row) -> str:
    return f"{row.label} ({model_name(row)})" if model_name(row) else row.label


def markdown_section(rows: list[Row], parities: list[Parity], threshold: float = PARITY_THRESHOLD) -> list[str]:
    """"## Loss parity" with one table line per causal_lm configuration and its notes."""
    lm = [row for row in rows if is_lm(row)]
    if not lm:
        return []
    by_label = {p.row.label: p for p in parities}
    header = ["configuration", "seeds", "final val loss", f"relative loss error vs {BASELINE} [95% CI]",
              "per seed", "verdict"]
    table = [header]
    for row in lm:
        mean, sd = _loss_cells(row)
        loss = "–" if mean is None else f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
        p = by_label.get(row.label)
        if row.precision == BASELINE:
            cells = ["–", "", "baseline"]
        elif p is None:
            cells = ["–", "", f"no {BASELINE} run at this setting"]
        else:
            error = "–" if p.mean is None else f"{percent(p.mean)} {p.interval} (paired, n={p.n})".replace("  ", " ")
            cells = [error, ", ".join(f"{s}: {percent(e)}" for s, e in p.errors.items()), p.verdict]
        table.append([_label(row), str(len(row.runs)), loss, *cells])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    threshold *= 100
    notes = [(f"Relative loss error = loss / {BASELINE} loss - 1 of the final validation loss (each run's last "
             "`val/loss`, logged after its last epoch), per seed both precisions ran; the mean over seeds with a "
             f"t-based 95% interval, paired by seed. Verdict: parity when the whole interval lies below "
             f"+{threshold:.2f}% (`--parity-threshold`; DeepSeek-V3 reports FP8 within 0.25% of BF16), worse when it "
             f"lies entirely above, undecided when it straddles it; fewer than {MIN_SEEDS} seeds give no interval "
             "and no verdict. In the table above, accuracy is next-token accuracy on the test split.")]
    for p in parities:
        if p.only_here or p.only_baseline:
            left = [f"seeds {', '.join(p.only_here)} without a {BASELINE} run"] if p.only_here else []
            left += [f"{BASELINE} seeds {', '.join(p.only_baseline)} without a {p.row.precision} run"] \
                if p.only_baseline else []
            notes.append(f"{p.row.label}: {'; '.join(left)}: left out of the loss pairing.")
    if any(is_tiny(row) for row in lm):
        notes.append("Tiny models (`*_tiny`, `model.size=tiny`) are toys: their loss parity says little about "
                     "FP8 at scale; judge it on the larger sizes.")
    return ["## Loss parity (causal_lm)", "", *lines, "", *[f"> {n}" for n in notes], ""]


def csv_columns(rows: list[Row], parities: list[Parity]) -> tuple[list[str], dict[str, list]]:
    """The CSV's loss columns (fractions, as the accuracy delta there): names, and label -> values."""
    by_label = {p.row.label: p for p in parities}
    values = {}
    for row in (r for r in rows if is_lm(r)):
        mean, sd = _loss_cells(row)
        p = by_label.get(row.label)
        parity = [p.mean, p.low, p.high, p.n, p.verdict] if p else [None] * 5
        values[row.label] = ["" if v is None else v for v in (mean, sd, *parity)]
    return CSV_COLUMNS, values


def summary_values(rows: list[Row], parities: list[Parity]) -> dict[str, dict[str, float | None]]:
    """Label -> the parent run's loss summary (parent.summary_metrics): `val_loss_mean` and, against
    the baseline, `rel_loss_error_pct`, `rel_loss_error_ci_low_pct`, `rel_loss_error_ci_high_pct`
    (percent: 0.2 is 0.2%)."""
    by_label = {p.row.label: p for p in parities}
    values = {}
    for row in (r for r in rows if is_lm(r)):
        p = by_label.get(row.label)
        errors = {"": p.mean, "_ci_low": p.low, "_ci_high": p.high} if p else {}
        values[row.label] = {"val_loss_mean": _loss_cells(row)[0],
                             **{f"rel_loss_error{name}_pct": value * 100 for name, value in errors.items()
                                if value is not None}}
    return values


def curve_panels(rows: list[Row], parities: list[Parity] = ()) -> list[tuple[str, list[Row]]]:
    """One panel per causal_lm setting (model size): its title (the size, the model, and each
    pairing's relative loss error and verdict) and its configurations, baseline first."""
    groups: dict[tuple, list[Row]] = {}
    for row in (r for r in rows if is_lm(r)):
        groups.setdefault(row.setting, []).append(row)
    panels = []
    for group in groups.values():
        title = f"{group[0].size_label} ({model_name(group[0])})" if model_name(group[0]) else group[0].size_label
        title += "".join(f"\n{p.row.precision}: {percent(p.mean)} {p.interval}".rstrip() + f", {p.verdict}"
                         for p in parities if any(p.row is r for r in group) and p.mean is not None)
        panels.append((title, sorted(group, key=lambda r: (r.precision != BASELINE, r.precision))))
    return panels
