"""The FP8 crossover on a GPU: BF16 vs FP8 step time at sizes where FP8 should win, with
proof from the compiled step that FP8 GEMMs really ran. Needs only a CUDA JAX plus the
wheels benchmarks/gpu_wheels.sh downloads: no TensorFlow, no MLflow, no network.

    python -m benchmarks.gpu_kit                      # hidden 1024..8192, ~10 min on one H100/H200
    python -m benchmarks.gpu_kit --llama 2048 4096    # also Llama blocks at 1B / 8B shapes (language_models.py)
    python -m benchmarks.gpu_kit --recipes            # also every FP8 recipe (precision.recipe) at hidden 4096, 8192
    python -m benchmarks.gpu_kit --data-parallel      # also the largest size data-parallel over every GPU here
    python -m benchmarks.gpu_kit --quick              # tiny, to check the code runs (CPU is fine)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from benchmarks import language_models
from benchmarks.common import QUICK_RECIPES, Timing, machine, markdown_table, measure, recipe_table, size_table
from fp8exp.config.precision import FP8_RECIPES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sequence", type=int, default=512, help="batch x sequence = the GEMMs' M")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-gpu.md"))
    parser.add_argument("--llama", type=int, nargs="*", default=[], choices=sorted(language_models.LLAMA_SHAPES),
                        help="hidden sizes of Llama-style causal LMs to time as well (Llama 3.2 1B / 3 8B blocks)")
    parser.add_argument("--llama-layers", type=int, default=4)
    parser.add_argument("--recipes", type=int, nargs="*", metavar="HIDDEN",
                        help="time every FP8 recipe against BF16 at these hidden sizes (default with the flag: 4096 8192)")
    parser.add_argument("--data-parallel", action="store_true",
                        help="time the largest size on every GPU here against one, the batch per GPU fixed")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.layers, args.batch, args.sequence, args.steps = [32], 1, 4, 16, 3

    timings = []
    for hidden in args.sizes:
        for precision in ("mixed_bfloat16", "float8"):
            timing = measure(precision, hidden, args.sequence, args.batch, args.steps, num_layers=args.layers)
            print(f"hidden {hidden} {precision}: {timing.median_ms:.2f} ms/step, FP8 GEMMs {timing.gemm}", flush=True)
            timings.append(timing)
    llama = []
    shapes = [language_models.model_config("llama", "base", hidden_dim=hidden, num_layers=args.llama_layers,
                                           max_sequence_length=args.sequence, **language_models.LLAMA_SHAPES[hidden])
              for hidden in args.llama]
    if args.quick and args.llama:
        shapes = [language_models.model_config("llama", "tiny")]
    for shape in shapes:
        for precision in ("mixed_bfloat16", "float8"):
            timing = language_models.measure("llama", precision, shape, args.batch, args.sequence, args.steps,
                                             vocabulary_size=32000)
            print(f"llama hidden {timing.hidden_dim} {precision}: {timing.median_ms:.2f} ms/step, "
                  f"{timing.tokens_per_s:,.0f} tokens/s, FP8 GEMMs {timing.gemm}", flush=True)
            llama.append(timing)
    recipes = [4096, 8192] if args.recipes == [] else args.recipes or []
    if args.quick and recipes:
        recipes = [args.sizes[0]]
    by_recipe = []
    for hidden in recipes:
        by_recipe.append(measure("mixed_bfloat16", hidden, args.sequence, args.batch, args.steps, num_layers=args.layers))
        for recipe in QUICK_RECIPES if args.quick else FP8_RECIPES:
            timing = measure("float8", hidden, args.sequence, args.batch, args.steps, num_layers=args.layers,
                             recipe=None if recipe == "delayed" else recipe)
            print(f"hidden {hidden} float8 recipe {recipe}: {timing.median_ms:.2f} ms/step, FP8 GEMMs {timing.gemm}",
                  flush=True)
            by_recipe.append(timing)
    parallel = []
    if args.data_parallel and len(jax.devices()) > 1:
        for precision in ("mixed_bfloat16", "float8"):
            for devices in (1, len(jax.devices())):
                timing = measure(precision, args.sizes[-1], args.sequence, args.batch, args.steps,
                                 num_layers=args.layers, devices=devices)
                print(f"hidden {args.sizes[-1]} {precision} on {devices} devices: {timing.median_ms:.2f} ms/step",
                      flush=True)
                parallel.append(timing)
    fp8 = [t for t in timings if t.precision == "float8"]
    verdict = ("every FP8 matmul ran as an FP8 GEMM" if all(t.gemm == "fused" for t in fp8) else
               "**not every FP8 matmul ran as an FP8 GEMM** (see the last column): the speed-up understates FP8")
    text = (f"Machine: {machine()}.\nCommand: `python -m benchmarks.gpu_kit {' '.join(argv or sys.argv[1:])}`.\n\n"
            f"{args.layers} decoder layers, batch {args.batch} x sequence {args.sequence} "
            f"(M = {args.batch * args.sequence} tokens per GEMM), intermediate 4x hidden, median of {args.steps} "
            f"steps after compilation. FP8 = Keras delayed scaling (amax history 1024) from mixed_bfloat16. "
            f"Check: {verdict}.\n\n" + size_table(timings) + "\n")
    if by_recipe:
        text += ("\nEvery FP8 recipe (`precision.recipe`), the same model and batch: its step time against BF16 and "
                 "against delayed, and whether its matmuls ran as FP8 GEMMs (`fused`) or were emulated (block and "
                 "mxfp8 are emulated unless JAX has block-scaled FP8 dots for this GPU):\n\n"
                 + recipe_table(by_recipe) + "\n")
    if args.data_parallel:
        text += "\n" + parallel_section(parallel, args.batch, args.sequence) + "\n"
    if llama:
        text += (f"\nLlama-style causal LMs ({args.llama_layers} blocks at Llama 3.2 1B / Llama 3 8B shapes: grouped-query "
                 f"attention, SwiGLU; vocabulary 32,000), batch {args.batch} x sequence {args.sequence}, next-token "
                 "loss, random weights:\n\n" + language_models.timing_table(llama) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def parallel_section(timings: list[Timing], batch: int, sequence: int) -> str:
    """Data-parallel over every device against one, the batch per device fixed (weak scaling):
    efficiency 100% = the gradient all-reduce costs nothing."""
    if not timings:
        return (f"Data-parallel: {len(jax.devices())} device here; the row needs a machine with several GPUs "
                "(`distribution=data_parallel`).")
    one = {t.precision: t.median_ms for t in timings if t.devices == 1}
    rows = [[t.precision, t.devices, t.devices * batch, f"{t.median_ms:.2f}",
             f"{t.devices * batch * sequence / t.median_ms * 1e3:,.0f}", f"{one[t.precision] / t.median_ms:.0%}",
             f"{t.gemm} ({t.fused}/{t.fp8_matmuls})" if t.precision == "float8" else "-"] for t in timings]
    return (f"Data-parallel (`distribution=data_parallel`, one process), hidden {timings[0].hidden_dim}, batch "
            f"{batch} x sequence {sequence} per device; scaling efficiency = one device's step time over this "
            "one's:\n\n" + markdown_table(["precision", "devices", "global batch", "ms/step", "tokens/s",
                                             "scaling efficiency", "FP8 GEMMs"], rows))


if __name__ == "__main__":
    sys.exit(main())
