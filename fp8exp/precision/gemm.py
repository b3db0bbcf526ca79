"""Is the FP8 matmul real? Keras implements FP8 as quantize-dequantize around a matmul in the
compute dtype; only XLA on GPUs with FP8 tensor cores rewrites that pattern into an FP8 GEMM.
This module counts, in the training step, the matmuls whose two operands come straight from
FP8 casts (what FP8 should accelerate), and, in the optimized HLO the compiler produced, the
matmuls that really run in FP8."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import keras
import numpy as np

HOPS = 8  # elementwise ops allowed between an FP8 cast and a matmul operand (dequantize, scale)
CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                   "custom_vjp_call_jaxpr", "remat", "checkpoint")
FP8_GEMM_TARGET = re.compile(r'custom_call_target="[^"]*f8[^"]*"')
FP8_DOT = re.compile(r"=\s*\S+\s+dot\(f8e\w+\[[^\]]*\]\S*\s+\S+,\s*f8e\w+")


@dataclass
class GemmReport:
    fp8_matmuls: int
    """Matmuls in the training step fed by FP8 casts on both sides (3 per quantized layer)."""
    fused: int
    """Matmuls the optimized HLO runs in FP8 (cuBLASLt FP8 custom calls or f8 dots)."""
    total_matmuls: int
    hlo: str

    @property
    def verdict(self) -> str:
        if self.fp8_matmuls and self.fused >= self.fp8_matmuls:
            return "fused"
        return "partial" if self.fused else "emulated"

    def metrics(self) -> dict[str, float]:
        return {"fp8/gemm/fp8_matmuls": self.fp8_matmuls, "fp8/gemm/fused": self.fused,
                "fp8/gemm/emulated": max(self.fp8_matmuls - self.fused, 0),
                "fp8/gemm/total_matmuls": self.total_matmuls}


def _is_fp8(aval) -> bool:
    return "float8" in str(getattr(aval, "dtype", ""))


def _sub_jaxpr(eqn):
    for value in eqn.params.values():
        if hasattr(value, "jaxpr") and hasattr(value, "consts"):
            return value.jaxpr
        if type(value).__name__ == "Jaxpr":
            return value
    return None


def _propagate(jaxpr, input_hops: list[float], counts: dict[str, int]) -> list[float]:
    """Forward pass over a jaxpr: hops from each value back to the nearest FP8 cast (a matmul
    output starts afresh). Counts matmuls on the way; returns the outputs' hops."""
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
        sub = _sub_jaxpr(eqn) if eqn.primitive.name in CALL_PRIMITIVES else None
        if eqn.primitive.name == "dot_general":
            counts["total"] += 1
            if all(h <= HOPS for h in inputs[:2]):
                counts["fp8"] += 1
            outputs = [math.inf] * len(eqn.outvars)
        elif sub is not None and len(sub.invars) == len(inputs):
            outputs = _propagate(sub, inputs, counts)
        else:
            if sub is not None:  # a control-flow body: count inside, treat as opaque outside
                _propagate(sub, [math.inf] * len(sub.invars), counts)
            nearest = min(inputs, default=math.inf) + 1
            outputs = [nearest] * len(eqn.outvars)
        for var, value in zip(eqn.outvars, outputs):
            hops[var] = 0.0 if _is_fp8(var.aval) else value
    return [read(v) for v in jaxpr.outvars]


def _train_state(model: keras.Model):
    return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables])


def inspect_train_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> GemmReport:
    """Trace and compile one training step of a model that has trained (so its optimizer and
    metrics exist) on a batch shaped like the training batches."""
    traced = jax.jit(model.train_step).trace(_train_state(model), (x, y))  # traced once, for both
    counts = {"total": 0, "fp8": 0}
    _propagate(traced.jaxpr.jaxpr, [math.inf] * len(traced.jaxpr.jaxpr.invars), counts)
    hlo = traced.lower().compile().as_text()
    fused = len(FP8_GEMM_TARGET.findall(hlo)) + len(FP8_DOT.findall(hlo))
    return GemmReport(counts["fp8"], fused, counts["total"], hlo)
