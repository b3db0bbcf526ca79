"""The report as files: table (Markdown and CSV), plots and notes, written into one folder."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from fp8exp.report import inference, parity, recipes
from fp8exp.report.plots import (
    plot_accuracy,
    plot_fp8_scales,
    plot_loss_parity,
    plot_step_time,
)
from fp8exp.report.rows import Row, attach_diverged, build_rows
from fp8exp.report.runs import BASELINE, ReportError, Source, slug
from fp8exp.report.stats import MIN_SEEDS
from fp8exp.report.tables import (
    SPEED_NOISE,
    crossover,
    markdown_table,
    pairing_notes,
    superseded_notes,
    write_csv,
)


class Report(NamedTuple):
    markdown: str
    files: list[Path]
    """Every file written, report.md first."""
    rows: list[Row]
    """The configurations the table shows, in its order."""


def write_report(client, source: Source, out: Path, speed_noise: float = SPEED_NOISE,
                 parity_threshold: float = parity.PARITY_THRESHOLD) -> Report:
    """Write every file; returns the Markdown, the paths written and the configurations. Speedups
    within `speed_noise` of 1.00x are called no clear speed change; language models (causal_lm)
    also get their loss parity against `parity_threshold` (parity.py) and `loss_parity.png`."""
    finished = [run for run in source.runs if run.status == "FINISHED" and "test/accuracy" in run.metrics]
    left_out = [run for run in source.runs if run not in finished]
    statuses = ", ".join(f"{sum(r.status == s for r in left_out)} {s}" for s in sorted({r.status for r in left_out}))
    if not finished:
        raise ReportError(f"{source.title} has no finished runs ({len(source.runs)} in all"
                          f"{': ' + statuses if statuses else ''}); nothing to compare")
    rows = build_rows(finished)
    attach_diverged(rows, left_out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if not any(row.precision == BASELINE for row in rows):
        notes.append(f"No {BASELINE} runs: accuracy deltas and speedups need the baseline; "
                     f"add precision={BASELINE} to the sweep.")
    if left_out:
        notes.append(f"Left out {len(left_out)} run(s) that did not finish ({statuses}): "
                     + ", ".join(run.name for run in left_out) + ".")
    notes += superseded_notes(rows) + pairing_notes(rows)
    devices = sorted({run.device for run in finished if run.device})
    if any(device.startswith("cpu") for device in devices):
        notes.append("Step times were measured on a CPU, where FP8 is emulated (quantize-dequantize around a "
                     "bfloat16 matmul): judge accuracy here, speed on a GPU with FP8 tensor cores.")

    files = [out / "report.md", out / "report.csv", out / "accuracy.png", out / "step_time.png"]
    parities = parity.loss_parity(rows, parity_threshold)
    panels = parity.curve_panels(rows, parities)
    write_csv(rows, out / "report.csv", parity.csv_columns(rows, parities) if panels else None)
    if panels:
        plot_loss_parity(client, panels, out / "loss_parity.png")
        files.append(out / "loss_parity.png")
    plot_accuracy(rows, out / "accuracy.png")
    note = crossover(rows, noise=speed_noise)
    plot_step_time(rows, out / "step_time.png", note)
    scale_plots = []
    for row in rows:
        path = out / f"fp8_scales_{slug(row.label)}.png"
        if plot_fp8_scales(client, min(row.runs, key=lambda r: r.seed), path):
            scale_plots.append(path)
    files += scale_plots

    lines = [f"# FP8 report: {source.title}", ""]
    lines += [f"- {line}" for line in parity.answer_lines(rows, speed_noise, parity_threshold)] or [
        "- nothing to compare against a baseline"]
    if note:
        lines.append(f"- {note}")
    lines += ["", markdown_table(rows, speed_noise), ""]
    lines += [f"> {n}" for n in notes]
    lines += ["", ("Each configuration counts a seed once: of reruns with the same configuration and seed, the latest "
              "finished run. Accuracy is the test split's, mean ± sd over seeds; Δ is in percentage points, paired "
              "on the seeds both precisions ran (unpaired, Welch, with fewer than 2 in common; t-based 95% interval). "
              f"A verdict needs {MIN_SEEDS} or more seeds; when every seed gives the same difference there is no "
              "interval, and only a zero difference is called exact. Step time is the median over seeds of each "
              "run's median step; speedup = baseline step time / this step time, within "
              f"±{speed_noise:.0%} of 1.00x no clear speed change."), ""]
    lines += parity.markdown_section(rows, parities, parity_threshold)
    lines += recipes.markdown_section(rows, parities, left_out)
    if inference.has_inference(rows):  # python -m fp8exp.infer_bench ran on this sweep
        lines += ["## Inference", "", inference.inference_table(rows), "", f"> {inference.NOTE}", ""]
    if panels:
        lines += ["![validation loss by precision](loss_parity.png)", ""]
    lines += ["![accuracy](accuracy.png)", "", "![step time](step_time.png)", ""]
    lines += [f"![{p.stem}]({p.name})" for p in scale_plots]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return Report(markdown, files, rows)
