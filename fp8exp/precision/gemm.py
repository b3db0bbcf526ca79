"""Is the FP8 matmul real? Keras implements FP8 as quantize-dequantize around a matmul in the
compute dtype; only XLA on GPUs with FP8 tensor cores rewrites that pattern into an FP8 GEMM.
This module counts, in the training step, the matmuls whose two operands come straight from
FP8 casts (what FP8 should accelerate), and, in the optimized HLO the compiler produced, the
matmuls that really run in FP8. Recipes whose scales vary along the contraction (block, mxfp8)
dequantize before a float32 matmul by construction, so their matmuls never run in FP8, except
mxfp8 on Blackwell, whose block-scaled GEMMs JAX runs (recipes/matmul.py native_block_scaled)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import keras
import numpy as np
from jax._src.lib import hlo as xla_hlo
from jax.extend import core

from fp8exp.precision.recipes.layers import recipe_layers
from fp8exp.precision.recipes.matmul import native_block_scaled
from fp8exp.precision.recipes.plan import plan

HOPS = 8  # elementwise ops allowed between an FP8 cast and a matmul operand (dequantize, scale)
# cuBLASLt FP8 GEMMs: per-tensor scaled (f8) and MX block scaled (mx); JAX's block-scaled dot
# (jax.nn.scaled_matmul, Blackwell's cuDNN MXFP8 GEMM; unverified on hardware here: a form XLA
# rewrites it to that these patterns miss is reported as not fused, never the other way round).
FP8_GEMM_TARGET = re.compile(r'custom_call_target="(?:__cublas\$lt\$matmul\$(?:f8|mx)|__op\$block_scaled_dot)"')
MATMULS = ("dot_general", "scaled_matmul_wrapper")  # jaxpr primitives; the second takes FP8 operands by type
FP8_DOT = re.compile(r"\sdot\(f8e\w+\[[^\]]*\]\S*\s+\S+,\s*f8e\w+")  # needs operand shapes printed
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+).*\{$")  # a computation's header line
FUSION_CALL = re.compile(r"\sfusion\(.*\bcalls=%?([^\s,]+)")  # a fusion and the computation it calls
# GEMM emitters' fusion kinds: __triton_gemm, __triton_nested_gemm_fusion, __cudnn$fusion
GEMM_FUSION_KIND = re.compile(r'"kind":"[^"]*(?:gemm|cudnn)[^"]*"')


@dataclass
class GemmReport:
    fp8_matmuls: int
    """Matmuls in the training step fed by FP8 casts on both sides (3 per quantized layer)."""
    fused: int
    """Matmuls the optimized HLO runs in FP8 (cuBLASLt FP8/MX custom calls, f8 dots, GEMM fusions of f8 dots)."""
    total_matmuls: int
    hlo: str
    """The optimized HLO, printed with operand types (see `optimized_hlo`)."""
    dequantized: int = 0
    """Matmuls of recipe layers whose operands are dequantized (block-scaled) before a float dot."""

    @property
    def verdict(self) -> str:
        if self.dequantized and self.dequantized >= self.fp8_matmuls:
            return "emulated"  # by construction, whatever the compiler did
        if self.fp8_matmuls and self.fused >= self.fp8_matmuls:
            return "fused"
        return "partial" if self.fused else "emulated"

    def metrics(self) -> dict[str, float]:
        return {"fp8/gemm/fp8_matmuls": self.fp8_matmuls, "fp8/gemm/fused": self.fused,
                "fp8/gemm/emulated": max(self.fp8_matmuls - self.fused, 0),
                "fp8/gemm/total_matmuls": self.total_matmuls, "fp8/gemm/dequantized": self.dequantized}


def dequantized_matmuls(model: keras.Model) -> int:
    """Matmuls per training step that a recipe runs as dequantize + float32 dot: those whose two
    operands are quantized and not both per-tensor/per-row (recipes/matmul.py), 3 per block or
    MX layer; per-tensor and rowwise operands feed the dot as FP8."""
    count = 0
    for layer in recipe_layers(model):
        p = plan(layer.recipe)
        count += sum(a.granularity != "none" and b.granularity != "none" and not (a.per_output and b.per_output)
                     and not native_block_scaled(a, b)
                     for a, b in ((p.fwd_x, p.fwd_w), (p.dgrad_dy, p.dgrad_w), (p.wgrad_x, p.wgrad_dy)))
    return count


def _is_fp8(aval) -> bool:
    return "float8" in str(getattr(aval, "dtype", ""))


def _bodies(eqn, inputs: list[float]) -> list[tuple]:
    """Each sub-jaxpr of an equation (call body, scan or while body, while condition, cond branch, any
    other primitive's) with the hops of its inputs and whether its outputs are the equation's, so that
    matmuls under control flow are counted and an FP8 cast outside reaches a matmul inside."""
    params = eqn.params
    if eqn.primitive.name == "while":  # operands: condition consts, body consts, carry
        c, b = params["cond_nconsts"], params["body_nconsts"]
        return [(params["cond_jaxpr"].jaxpr, inputs[:c] + inputs[c + b:], False),
                (params["body_jaxpr"].jaxpr, inputs[c:], True)]
    bodies = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            sub = item.jaxpr if isinstance(item, core.ClosedJaxpr) else item
            if isinstance(sub, core.Jaxpr):  # calls and scan take all operands, cond branches all but the index
                n = len(sub.invars)
                sub_inputs = inputs[len(inputs) - n:] if n <= len(inputs) else [math.inf] * n
                bodies.append((sub, sub_inputs, len(sub.outvars) == len(eqn.outvars)))
    return bodies


def _propagate(jaxpr, input_hops: list[float], counts: dict[str, int]) -> list[float]:
    """Forward pass over a jaxpr: hops from each value back to the nearest FP8 cast (a matmul
    output starts afresh). Counts matmuls on the way, a loop body's once as in the compiled HLO;
    returns the outputs' hops."""
    hops: dict = {}

    def read(var):
        if type(var).__name__ == "Literal":
            return math.inf
        return hops.get(var, math.inf)

    for var, value in zip(jaxpr.invars, input_hops):
        hops[var] = 0.0 if _is_fp8(var.aval) else value
    for var in jaxpr.constvars:
        hops[var] = math.inf
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        if eqn.primitive.name in MATMULS:
            counts["total"] += 1
            if all(h <= HOPS for h in inputs[:2]):
                counts["fp8"] += 1
            outputs = [math.inf] * len(eqn.outvars)
        elif bodies := _bodies(eqn, inputs):  # a cond's output is FP8-fed only if it is in every branch
            returned = [(_propagate(sub, sub_inputs, counts), gives) for sub, sub_inputs, gives in bodies]
            returned = [out for out, gives in returned if gives]
            outputs = [max(h) for h in zip(*returned)] if returned else [math.inf] * len(eqn.outvars)
        else:
            nearest = min(inputs, default=math.inf) + 1
            outputs = [nearest] * len(eqn.outvars)
        for var, value in zip(eqn.outvars, outputs):
            hops[var] = 0.0 if _is_fp8(var.aval) else value
    return [read(v) for v in jaxpr.outvars]


def count_matmuls(jaxpr) -> dict[str, int]:
    """Matmuls in a jaxpr: "total", and "fp8" for those whose two operands come from FP8 casts."""
    counts = {"total": 0, "fp8": 0}
    _propagate(jaxpr, [math.inf] * len(jaxpr.invars), counts)
    return counts


def optimized_hlo(compiled: jax.stages.Compiled) -> str:
    """The optimized HLO printed with operand types: `Compiled.as_text()` prints `dot(%a, %b)`, which
    hides from this check, and from a reader of the saved text, which dots take FP8 operands."""
    options = xla_hlo.HloPrintOptions()
    options.print_operand_shape = True
    return "\n\n".join(module.to_string(options) for module in compiled.runtime_executable().hlo_modules())


def _computations(module: str) -> dict[str, list[str]]:
    """Instruction lines of each computation of an HLO module, by name ("" for lines outside one)."""
    bodies: dict[str, list[str]] = {"": []}
    current = ""
    for line in module.splitlines():
        header = None if line[:1].isspace() else COMPUTATION.match(line.rstrip())
        if header:
            current = header.group(1)
            bodies.setdefault(current, [])
        elif line.startswith("}"):
            current = ""
        else:
            bodies[current].append(line)
    return bodies


def count_fp8_gemms(hlo: str) -> int:
    """FP8 GEMMs in optimized HLO printed with operand types: cuBLASLt FP8/MX custom calls, f8 x f8
    dots, and GEMM fusions (Triton, cuDNN; XLA forms them before its FP8 GEMM rewriter) whose fused
    computation holds an f8 x f8 dot. Each fusion counts once: dots inside fusions count only through
    a GEMM fusion that calls them."""
    found = 0
    for module in re.split(r"^(?=HloModule )", hlo, flags=re.MULTILINE):
        bodies = _computations(module)
        fused = set()
        for line in (line for lines in bodies.values() for line in lines):
            found += len(FP8_GEMM_TARGET.findall(line))
            if call := FUSION_CALL.search(line):
                fused.add(call.group(1))
                fp8_body = any(FP8_DOT.search(inner) for inner in bodies.get(call.group(1), []))
                found += bool(fp8_body and GEMM_FUSION_KIND.search(line))
        found += sum(len(FP8_DOT.findall("\n".join(lines))) for name, lines in bodies.items() if name not in fused)
    return found


def _train_state(model: keras.Model):
    return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables])


def inspect_train_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> GemmReport:
    """Trace and compile one training step of a model that has trained (so its optimizer and
    metrics exist) on a batch shaped like the training batches."""
    traced = jax.jit(model.train_step).trace(_train_state(model), (x, y))  # traced once, for both
    counts = count_matmuls(traced.jaxpr.jaxpr)
    hlo = optimized_hlo(traced.lower().compile())
    return GemmReport(counts["fp8"], count_fp8_gemms(hlo), counts["total"], hlo, dequantized_matmuls(model))
