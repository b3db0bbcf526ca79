"""The report's plots (PNG): accuracy by precision and size, step time by size, FP8 scales, and for
language models the validation-loss curves of each precision per size."""

from __future__ import annotations

import math
from pathlib import Path

from fp8exp.report.rows import Row
from fp8exp.report.runs import BASELINE, STEP_MS, VAL_LOSS, VAL_LOSS_STEP, RunData

SCALED_TENSORS = ("inputs", "kernel", "outputs_grad")


def _figure(width: float = 7.0, height: float = 4.2, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)


def _save(fig, path: Path, dpi: int = 110) -> None:
    """Write and close: pyplot keeps every open figure alive."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _precisions(rows: list[Row]) -> list[str]:
    return sorted({row.precision for row in rows}, key=lambda p: (p != BASELINE, p))


def plot_accuracy(rows: list[Row], path: Path) -> None:
    fig, [[ax]] = _figure()
    sizes = list(dict.fromkeys(row.size_label for row in rows))
    precisions = _precisions(rows)
    width = 0.8 / len(precisions)
    for i, precision in enumerate(precisions):
        for row in (r for r in rows if r.precision == precision):
            x = sizes.index(row.size_label) + (i - (len(precisions) - 1) / 2) * width
            acc = row.accuracy
            ax.errorbar([x], [acc.mean()], yerr=[acc.std(ddof=1) if len(acc) > 1 else 0], fmt="o", capsize=4,
                        color=f"C{i}", label=precision if row is next(r for r in rows if r.precision == precision) else None)
            ax.scatter([x] * len(acc), acc, s=12, color=f"C{i}", alpha=0.4)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy by precision and size (mean ± sd; dots are seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_step_time(rows: list[Row], path: Path, note: str) -> None:
    fig, [[ax]] = _figure()
    sizes = list(dict.fromkeys(row.size_label for row in rows))
    numeric = all(row.hidden_dim for row in rows) and len({row.hidden_dim for row in rows}) == len(sizes)
    for i, precision in enumerate(_precisions(rows)):
        mine = [row for row in rows if row.precision == precision and row.median(STEP_MS)]
        xs = [row.hidden_dim if numeric else sizes.index(row.size_label) for row in mine]
        ax.plot(xs, [row.median(STEP_MS) for row in mine], "o-", color=f"C{i}", label=precision)
    if numeric:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({row.hidden_dim for row in rows}), [str(h) for h in sorted({row.hidden_dim for row in rows})])
        ax.set_xlabel("model.hidden_dim")
    else:
        ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("median step time (ms, lower is faster)")
    ax.set_title("Step time by size" + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_fp8_scales(client, run: RunData, path: Path) -> bool:
    """Every quantized layer's scale over training, one panel per scaled tensor; False when the
    run logged no FP8 state (any precision but float8)."""
    keys = sorted(k for k in run.metrics if k.startswith("fp8/") and k.endswith("_scale"))
    if not keys:
        return False
    fig, axes = _figure(width=4.6, height=3.8, ncols=len(SCALED_TENSORS))
    for ax, tensor in zip(axes[0], SCALED_TENSORS):
        for key in (k for k in keys if k.endswith(f"/{tensor}_scale")):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key))
            ax.plot([s for s, _ in history], [v for _, v in history], ".-", label=key[4:-len(f"/{tensor}_scale")])
        ax.set_yscale("log")
        ax.set_title(f"{tensor}_scale")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("scale (amax / fp8 max)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"FP8 scales per layer: {run.name}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    _save(fig, path, dpi=100)
    return True


def loss_curve(client, run: RunData, key: str) -> dict[float, float]:
    """x -> value of one run's metric history (of values logged twice at a step, the later)."""
    history = sorted(client.get_metric_history(run.run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def curve_key(rows: list[Row]) -> str:
    """`val/loss_step` (x = optimizer step) when every run of `rows` logged it, else `val/loss` (x = epoch)."""
    return VAL_LOSS_STEP if all(VAL_LOSS_STEP in run.metrics for row in rows for run in row.runs) else VAL_LOSS


def plot_loss_parity(client, panels: list[tuple[str, list[Row]]], path: Path) -> None:
    """One panel per size: each precision's validation loss, the mean over its seeds as a line and
    the range over seeds (min to max) as a band; the series is the panel's `curve_key`."""
    fig, axes = _figure(width=5.2, height=4.0, ncols=len(panels))
    colors = {p: f"C{i}" for i, p in enumerate(_precisions([row for _, group in panels for row in group]))}
    for ax, (title, group) in zip(axes[0], panels):
        key = curve_key(group)
        for row in group:
            curves = [loss_curve(client, run, key) for run in row.runs]
            xs = sorted({x for curve in curves for x in curve})
            values = [[curve[x] for curve in curves if x in curve] for x in xs]
            color = colors[row.precision]
            ax.plot(xs, [sum(v) / len(v) for v in values], "o-" if len(xs) < 12 else "-", color=color, ms=3,
                    label=f"{row.precision} (mean of {len(curves)} seed{'s' if len(curves) != 1 else ''})")
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step" if key == VAL_LOSS_STEP else "epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"validation loss ({key})")
    fig.suptitle("Validation loss by precision: line = mean over seeds, band = min to max over seeds", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
