"""The benchmark code runs (on tiny sizes), so `make bench` and the GPU kit cannot rot.
Nothing here judges a timing: benchmarks measure, tests check."""

import os
import re
import subprocess
import sys

import pytest

from benchmarks import language_models, run
from benchmarks.common import QUICK_RECIPES, Timing, recipe_table, size_table
from tests.conftest import ROOT, needs_clothing

pytestmark = pytest.mark.slow


def test_size_table_reports_fp8_speedup_against_bf16():
    table = size_table([Timing("mixed_bfloat16", 1024, 512, 10.0, "-", 0, 0),
                        Timing("float8", 1024, 512, 8.0, "fused", 6, 6)])
    assert "| 1024 | 512 | 10.00 | 8.00 | 1.25x | fused (6/6) |" in table


def test_recipe_table_costs_each_recipe_against_delayed_and_bf16():
    table = recipe_table([Timing("mixed_bfloat16", 4096, 512, 30.0, "-", 0, 0),
                          Timing("float8", 4096, 512, 20.0, "fused", 6, 6),
                          Timing("float8", 4096, 512, 25.0, "emulated", 6, 0, recipe="block")])
    assert "| 4096 | delayed | 20.00 | 1.00x | 1.50x | fused (6/6) |" in table
    assert "| 4096 | block | 25.00 | 1.25x | 1.20x | emulated (0/6) |" in table


def test_quick_sections_write_their_tables(tmp_path):
    """The size sweep shares its code (common.measure, size_table) with the GPU kit below."""
    out = tmp_path / "benchmarks.md"
    assert run.main(["--quick", "--only", "overhead", "honest", "recipes", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## Framework overhead", "## Honest step time", "## FP8 recipes (emulation cost)", "## GPU kit"):
        assert heading in text
    for recipe in QUICK_RECIPES:  # --quick: delayed and one of fp8exp's recipes, the two code paths
        assert re.search(rf"\| 32 \| {recipe} \| \d+\.\d\d \| \d+\.\d\dx \| - \| - \|", text), recipe
    assert re.search(r"is \d+\.\d\dx delayed's step time \(goal: at most 1.5x\)", text)
    assert re.search(r"\*\*Median ratio \d+\.\d{3}\*\*", text)
    assert re.search(r"\| float8 \| \d+\.\d\d \| \d+\.\d\d \| [+-]\d+\.\d%", text)


@needs_clothing
def test_quick_data_path_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert run.main(["--quick", "--only", "data", "--out", str(out)]) == 0
    assert re.search(r"Cold speed-up \d+\.\dx", out.read_text())


def test_gpu_kit_runs_on_cpu_and_says_fp8_was_not_fused(tmp_path):
    """On 4 virtual CPU devices, so that the data-parallel rows run as on a multi-GPU machine."""
    out = tmp_path / "gpu.md"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    kit = subprocess.run([sys.executable, "-m", "benchmarks.gpu_kit", "--quick", "--llama", "2048", "--recipes",
                          "--data-parallel", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert kit.returncode == 0, kit.stderr[-3000:]
    text = out.read_text()
    for precision in ("mixed_bfloat16", "float8"):  # one device, then all 4 with 4x the batch
        assert re.search(rf"\| {precision} \| 1 \| 4 \| \d+\.\d\d \| [\d,]+ \| 100% \|", text), precision
        assert re.search(rf"\| {precision} \| 4 \| 16 \| \d+\.\d\d \| [\d,]+ \| \d+% \|", text), precision
    for recipe in QUICK_RECIPES:  # each recipe against bf16 at the quick size, with its GEMM check
        assert re.search(rf"\| 32 \| {recipe} \| \d+\.\d\d \| \d+\.\d\dx \| \d+\.\d\dx \| emulated \(0/\d+\) \|", text), recipe
    assert re.search(r"\| llama \| 64 \| [\d,]+ \| [\d,]+ \| \d+\.\d\dx \| emulated \(0/\d+\) \|", text)
    assert "**not every FP8 matmul ran as an FP8 GEMM**" in text
    assert "emulated (0/24)" in text  # the CPU's FP8 is labelled as emulation


def test_quick_language_model_sections_write_their_tables(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert run.main(["--quick", "--only", "families", "lm_overhead", "--out", str(out)]) == 0
    text = out.read_text()
    for family in language_models.QUICK_FAMILIES:
        assert re.search(rf"\| {family} \| \d+ \| [\d,]+ \| [\d,]+ \| \d+\.\d\dx \| - \|", text), family
    assert re.search(r"\*\*Median ratio \d+\.\d{3}\*\* \(goal: at most 1.03\)", text.split("## Language-model overhead")[1])


@needs_clothing
def test_quick_language_model_data_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert run.main(["--quick", "--only", "lm_data", "--out", str(out)]) == 0
    assert re.search(r"Cold speed-up \d+\.\dx \(goal 10x\)", out.read_text())


def test_quick_multiprocess_section_times_one_and_two_processes(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert run.main(["--quick", "--only", "processes", "--out", str(out)]) == 0
    text = out.read_text()
    assert re.search(r"\| 1 process x 4 devices \| \d+\.\d \| [\d., ]+ \| 1\.00x \|", text)
    assert re.search(r"\| 2 processes x 2 devices \| \d+\.\d \| [\d., ]+ \| \d+\.\d\dx \|", text)
