"""`python -m fp8exp.report`: did FP8 cost accuracy, and was it faster? Reads the runs of a sweep
from MLflow and writes a table (Markdown and CSV) with one row per configuration, plots (PNG) and
a console summary; with a sweep, all of it is logged as artifacts on the sweep's parent run, and
the answer set on it as summary metrics, the `fp8exp.verdict` tag and its description (parent.py).

    python -m fp8exp.report                     # the latest sweep in the store
    python -m fp8exp.report --parent RUN_ID     # one sweep
    python -m fp8exp.report --experiment NAME   # every finished run of an experiment
    python -m fp8exp.report --speed-noise 0.05  # speedups within ±5% read "no clear speed change"
    python -m fp8exp.report --parity-threshold 0.005  # language models: parity within +0.5% loss
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fp8exp.report.document import write_report
from fp8exp.report.parent import publish
from fp8exp.report.parity import PARITY_THRESHOLD
from fp8exp.report.runs import ReportError, default_out_dir, find_source
from fp8exp.report.tables import SPEED_NOISE


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), e.g. 0.03 for 3%; got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8exp.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent", metavar="RUN_ID", help="the sweep's parent run (default: the latest sweep)")
    which.add_argument("--experiment", metavar="NAME", help="every run of this experiment instead of one sweep")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///<current dir>/mlflow.db, as fp8exp)")
    parser.add_argument("--out", type=Path, help="output folder (default: <sweep dir>/report)")
    parser.add_argument("--speed-noise", type=fraction, default=SPEED_NOISE, metavar="FRACTION",
                        help=f"speedups within this fraction of 1.00x are no clear speed change (default {SPEED_NOISE})")
    parser.add_argument("--parity-threshold", type=fraction, default=PARITY_THRESHOLD, metavar="FRACTION",
                        help="causal_lm: FP8's final validation loss is at parity when the 95%% CI of loss_fp8 / "
                             f"loss_bf16 - 1 lies below +FRACTION (default {PARITY_THRESHOLD}, DeepSeek-V3's 0.25%%)")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from fp8exp.config import tracking_uri

    uri = tracking_uri(OmegaConf.create({"tracking": {"uri": args.tracking_uri}}))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"fp8exp.report: error: no MLflow store at {uri}; run a sweep here first or pass --tracking-uri",
              file=sys.stderr)
        return 1
    client = MlflowClient(uri)
    try:
        source = find_source(client, args.parent, args.experiment)
        out = args.out or default_out_dir(source)
        markdown, files, rows = write_report(client, source, out, args.speed_noise, args.parity_threshold)
    except ReportError as error:
        print(f"fp8exp.report: error: {error}", file=sys.stderr)
        return 1
    if source.parent_run_id:
        publish(client, source.parent_run_id, rows, markdown, out, args.speed_noise, args.parity_threshold)
    print(markdown.split("\n![", 1)[0].rstrip())
    print(f"\nWrote {', '.join(p.name for p in files)} to {out}"
          + (f"; logged under 'report/' on parent run {source.parent_run_id}, with its summary/ metrics, "
             "verdict and description" if source.parent_run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
