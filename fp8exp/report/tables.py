"""The report's words and tables: the headline answer, the Markdown table, the CSV and the notes
on which runs and seeds were left out."""

from __future__ import annotations

import csv
from pathlib import Path

from fp8exp.report.rows import Row
from fp8exp.report.runs import BASELINE, STEP_MS

COLUMNS = ["precision", "size", "seeds", "test accuracy", f"Δ accuracy vs {BASELINE} [95% CI]", "verdict",
           "step ms (median)", "speedup", "examples/s", "params"]
SPEED_NOISE = 0.03
"""Speedups within ±3% of 1.00x are called no clear speed change: median step times of identical
runs differ by a few percent (other load, clocks). `python -m fp8exp.report --speed-noise` sets it."""


def points(x: float) -> str:
    """A fraction as signed percentage points: 0.0123 -> "+1.23"."""
    return f"{x * 100:+.2f}"


def _seeds(seeds, has: bool = False) -> str:
    """"seed 3", "seeds 0, 1"; with `has`: "seed 3 has", "seeds 0, 1 have"."""
    one = len(seeds) == 1
    return ("seed " if one else "seeds ") + ", ".join(seeds) + ((" has" if one else " have") if has else "")


def speed_verdict(speedup: float | None, noise: float = SPEED_NOISE) -> str:
    """e.g. "0.94x (6% slower)": the percentage is of the baseline's speed."""
    if speedup is None:
        return ""
    if abs(speedup - 1) <= noise:
        return f"{speedup:.2f}x (no clear speed change)"
    return f"{speedup:.2f}x ({abs(speedup - 1):.0%} {'faster' if speedup > 1 else 'slower'})"


def verdict(row: Row, noise: float = SPEED_NOISE) -> str:
    if row.precision == BASELINE:
        return "baseline"
    if row.delta is None:
        return "no baseline to compare"
    return f"{row.delta.verdict}; " + (speed_verdict(row.speedup, noise) or "no step time")


def delta_cell(row: Row) -> str:
    d = row.delta
    if d is None:
        return "–"
    how = f"paired, n={d.n}" if d.paired else f"unpaired, n={d.n} vs {d.n_baseline}"
    if d.constant:
        return f"{points(d.mean)} pts ({how}, no variance)"
    if d.low is None:
        return f"{points(d.mean)} pts (n={min(d.n, d.n_baseline)}, no CI)"
    return f"{points(d.mean)} pts [{points(d.low)}, {points(d.high)}] ({how})"


def table_cells(row: Row, noise: float = SPEED_NOISE) -> list[str]:
    acc = row.accuracy
    spread = f" ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else ""
    seeds = str(len(row.runs)) + (f" ({len(row.runs) + len(row.superseded)} runs)" if row.superseded else "")
    step, rate, params = row.median(STEP_MS), row.median("perf/examples_per_s"), row.median("model/params")
    return [row.precision, row.size_label, seeds, f"{acc.mean():.4f}{spread}" if len(acc) else "–",
            delta_cell(row), verdict(row, noise), f"{step:.2f}" if step else "–",
            f"{row.speedup:.2f}x" if row.speedup else ("1.00x" if row.precision == BASELINE and step else "–"),
            f"{rate:,.0f}" if rate else "–", f"{params:,.0f}" if params else "–"]


def markdown_table(rows: list[Row], noise: float = SPEED_NOISE) -> str:
    cells = [COLUMNS] + [table_cells(row, noise) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path, extra: tuple[list[str], dict[str, list]] | None = None) -> None:
    """One line per row. `extra`: more columns (their names, and row label -> values), e.g. the
    loss parity's (parity.csv_columns); a row without values gets empty cells."""
    names, values = extra or ([], {})
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        setting_keys = [k for k, _ in rows[0].setting]
        out.writerow(["precision", *setting_keys, "seeds", "test_accuracy_mean", "test_accuracy_sd",
                      "delta_accuracy", "delta_ci_low", "delta_ci_high", "delta_paired", "delta_n",
                      "step_time_ms_median", "speedup", "examples_per_s_median", "params", "run_ids",
                      "superseded_run_ids", *names])
        for row in rows:
            acc, d = row.accuracy, row.delta
            out.writerow([row.precision, *[v for _, v in row.setting], len(row.runs),
                          acc.mean() if len(acc) else "", acc.std(ddof=1) if len(acc) > 1 else "",
                          d.mean if d else "", d.low if d and d.low is not None else "",
                          d.high if d and d.high is not None else "", d.paired if d else "", d.n if d else "",
                          row.median(STEP_MS) or "", row.speedup or "", row.median("perf/examples_per_s") or "",
                          row.median("model/params") or "", " ".join(r.run_id for r in row.runs),
                          " ".join(r.run_id for r in row.superseded), *values.get(row.label, [""] * len(names))])


def headline(rows: list[Row], noise: float = SPEED_NOISE) -> list[str]:
    """The answer in one line per compared configuration."""
    lines = []
    for row in rows:
        if row.delta is None:
            continue
        d = row.delta
        interval = f" [95% CI {points(d.low)}, {points(d.high)}] -> {d.verdict}" if d.low is not None else f" ({d.verdict})"
        lines.append(f"{row.label}: accuracy {points(d.mean)} pts vs {BASELINE}{interval}; "
                     f"{speed_verdict(row.speedup, noise) or 'no step time'}")
    return lines


def crossover(rows: list[Row], precision: str = "float8", noise: float = SPEED_NOISE) -> str:
    """Where `precision` beats the baseline's step time by more than the noise, in size order."""
    faster = [row.size_label for row in rows if row.precision == precision and row.speedup]
    wins = [row.size_label for row in rows if row.precision == precision and (row.speedup or 0) > 1 + noise]
    if not faster:
        return ""
    if not wins:
        return f"{precision} is never faster than {BASELINE} here"
    return f"{precision} is faster than {BASELINE} at {', '.join(wins)}"


def superseded_notes(rows: list[Row]) -> list[str]:
    """The reruns left out, each with the run that replaced it."""
    left = [(row, old, next(r for r in row.runs if r.seed == old.seed)) for row in rows for old in row.superseded]
    if not left:
        return []
    return [f"Left out {len(left)} run(s) superseded by a later finished run of the same configuration and seed "
            "(only the latest counts): " + "; ".join(
                f"{row.label}{' seed ' + old.seed if old.seed else ''}: {old.name} ({old.run_id[:8]}) "
                f"by {new.run_id[:8]}" for row, old, new in left) + "."]


def pairing_notes(rows: list[Row]) -> list[str]:
    """Which seeds had no partner on the other side, and what was compared instead."""
    notes = []
    for row in rows:
        d = row.delta
        if d is None or not (d.only_here or d.only_baseline):
            continue
        missing = [f"{_seeds(d.only_here, has=True)} no {BASELINE} run"] if d.only_here else []
        if d.only_baseline:
            missing.append(f"{BASELINE} {_seeds(d.only_baseline, has=True)} no {row.precision} run")
        how = (f"compared on {_seeds(d.common)}" if d.paired else
               "fewer than 2 seeds in common: compared unpaired (Welch) on all seeds")
        notes.append(f"{row.label}: {'; '.join(missing)}; {how}.")
    return notes
