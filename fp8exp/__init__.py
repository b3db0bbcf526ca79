"""fp8exp: should I train this Keras Transformer in FP8, and what does it cost me?"""

import os

# Keras reads its backend once, at first import; fp8exp is a JAX tool.
os.environ.setdefault("KERAS_BACKEND", "jax")
# TensorFlow is only a text-pipeline dependency: keep it off the accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
