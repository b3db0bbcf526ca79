"""What one run over several processes costs on a CPU: the same float8 data-parallel run on 4
devices as 1 process x 4 devices and as 2 processes x 2 devices (JAX's multi-controller runtime,
gloo collectives over loopback), so that every step's gradient all-reduce crosses processes."""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
STEP_MS = re.compile(r"([\d.]+) ms/step \(median\)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def median_ms(processes: int, steps: int, store: Path) -> float:
    """Start `processes` `python -m fp8exp` processes with 4 // processes CPU devices each and return
    the median step time process 0 reports."""
    settings = ["data=synthetic", "data.sequence_length=64", f"data.num_train={32 * steps}", "data.num_validation=64",
                "data.num_test=64", "data.vocabulary_size=1000", "trainer.epochs=1", "trainer.batch_size=32",
                "precision=float8", "distribution=data_parallel", "tracking.fp8_probe=false", "tracking.fp8_whatif=false",
                "tracking.system_metrics=false", "tracking.save_model=false", "tracking.fp8_gemm_check=false",
                f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"tracking.artifact_root={store / 'artifacts'}"]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes}"}
    port = _free_port()
    launched = []
    for index in range(processes):
        together = [f"distribution.coordinator=127.0.0.1:{port}", f"distribution.num_processes={processes}",
                    f"distribution.process_id={index}"] if processes > 1 else []
        launched.append(subprocess.Popen(
            [sys.executable, "-m", "fp8exp", *settings, *together, f"hydra.run.dir={store / 'hydra' / str(index)}"],
            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [process.communicate(timeout=900)[0] for process in launched]
    if any(process.returncode for process in launched) or not STEP_MS.search(outputs[0]):
        raise RuntimeError(f"a {processes}-process run failed:\n" + outputs[0][-2000:])
    return float(STEP_MS.search(outputs[0]).group(1))


def section(quick: bool) -> str:
    steps, repeats = (8, 1) if quick else (40, 2)
    timings: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):  # interleaved
            for processes in timings:
                timings[processes].append(median_ms(processes, steps, Path(tmp) / f"{processes}-{repeat}"))
    one, two = (statistics.median(timings[p]) for p in (1, 2))
    rows = [["1 process x 4 devices", f"{one:.1f}", ", ".join(f"{t:.1f}" for t in timings[1]), "1.00x"],
            ["2 processes x 2 devices", f"{two:.1f}", ", ".join(f"{t:.1f}" for t in timings[2]), f"{two / one:.2f}x"]]
    return (f"One float8 data-parallel run on 4 virtual CPU devices (`python -m fp8exp`, the tiny model, global "
            f"batch 32, {steps} steps; the median step time process 0 reports, median of {repeats} interleaved "
            "runs): on one process, and split over two processes that meet at 127.0.0.1 and all-reduce every "
            "step's gradients through gloo. The difference is the cross-process all-reduce on this machine: on a "
            "CPU this setup is for testing; on GPUs the collectives go over NCCL.\n\n"
            + markdown_table(["layout", "median ms/step", "each run", "vs one process"], rows) + "\n")
