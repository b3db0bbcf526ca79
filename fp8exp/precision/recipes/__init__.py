"""FP8 recipes beyond Keras' delayed scaling (current, rowwise, rowwise_gw_hp, block, mxfp8; nvfp4
for what-if numerics), as a quantized matmul with a custom VJP and the Keras layers that use it.

Self-contained: imports jax, numpy, ml_dtypes and keras only, nothing else of fp8exp, so it can
travel with a saved model. recipe.py (names, options, defaults) is plain Python; then
formats -> quantize (-> nvfp4, stats) -> plan -> matmul -> layers.
"""
