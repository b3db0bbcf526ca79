"""The report's words and tables: the headline answer, the Markdown table and the CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from fp8exp.report.rows import Row
from fp8exp.report.runs import BASELINE, STEP_MS

COLUMNS = ["precision", "size", "seeds", "test accuracy", f"Δ accuracy vs {BASELINE} [95% CI]", "verdict",
           "step ms (median)", "speedup", "examples/s", "params"]


def _pts(x: float) -> str:
    return f"{x * 100:+.2f}"


def speed_verdict(speedup: float | None) -> str:
    if speedup is None:
        return ""
    return f"{speedup:.2f}x " + ("faster" if speedup > 1 else "slower")


def verdict(row: Row) -> str:
    if row.precision == BASELINE:
        return "baseline"
    if row.delta is None:
        return "no baseline to compare"
    return f"{row.delta.verdict}; " + (speed_verdict(row.speedup) or "no step time")


def table_cells(row: Row) -> list[str]:
    acc = row.accuracy
    spread = f" ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else ""
    if row.delta is None:
        delta = "–"
    elif row.delta.low is None:
        delta = f"{_pts(row.delta.mean)} pts (n={row.delta.n}, no CI)"
    else:
        delta = (f"{_pts(row.delta.mean)} pts [{_pts(row.delta.low)}, {_pts(row.delta.high)}]"
                 f"{'' if row.delta.paired else ' unpaired'}")
    step, rate, params = row.median(STEP_MS), row.median("perf/examples_per_s"), row.median("model/params")
    return [row.precision, row.size_label, str(len(row.runs)), f"{acc.mean():.4f}{spread}" if len(acc) else "–",
            delta, verdict(row), f"{step:.2f}" if step else "–",
            f"{row.speedup:.2f}x" if row.speedup else ("1.00x" if row.precision == BASELINE and step else "–"),
            f"{rate:,.0f}" if rate else "–", f"{params:,.0f}" if params else "–"]


def markdown_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        setting_keys = [k for k, _ in rows[0].setting]
        out.writerow(["precision", *setting_keys, "seeds", "test_accuracy_mean", "test_accuracy_sd",
                      "delta_accuracy", "delta_ci_low", "delta_ci_high", "delta_paired",
                      "step_time_ms_median", "speedup", "examples_per_s_median", "params", "run_ids"])
        for row in rows:
            acc, d = row.accuracy, row.delta
            out.writerow([row.precision, *[v for _, v in row.setting], len(row.runs),
                          acc.mean() if len(acc) else "", acc.std(ddof=1) if len(acc) > 1 else "",
                          d.mean if d else "", d.low if d and d.low is not None else "",
                          d.high if d and d.high is not None else "", d.paired if d else "",
                          row.median(STEP_MS) or "", row.speedup or "", row.median("perf/examples_per_s") or "",
                          row.median("model/params") or "", " ".join(r.run_id for r in row.runs)])


def headline(rows: list[Row]) -> list[str]:
    """The answer in one line per compared configuration."""
    lines = []
    for row in rows:
        if row.delta is None:
            continue
        d = row.delta
        interval = f" [95% CI {_pts(d.low)}, {_pts(d.high)}] -> {d.verdict}" if d.low is not None else f" ({d.verdict})"
        lines.append(f"{row.label}: accuracy {_pts(d.mean)} pts vs {BASELINE}{interval}; "
                     f"{speed_verdict(row.speedup) or 'no step time'}")
    return lines


def crossover(rows: list[Row], precision: str = "float8") -> str:
    """Where `precision` first beats the baseline's step time, in size order."""
    faster = [row.size_label for row in rows if row.precision == precision and row.speedup]
    wins = [row.size_label for row in rows if row.precision == precision and (row.speedup or 0) > 1]
    if not faster:
        return ""
    if not wins:
        return f"{precision} is never faster than {BASELINE} here"
    return f"{precision} is faster than {BASELINE} at {', '.join(wins)}"
