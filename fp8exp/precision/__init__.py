"""Precision as a component applied to a built model: dtype policies and FP8 quantization
(policy), the FP8 scaling state (scales), whether FP8 matmuls really run in FP8 (gemm), headroom
on a probe batch (probe), and health and coverage verdicts (health); values read back whole
where they are split over processes (readback)."""
