"""`make bench` and the GPU kit. fp8exp first: it selects the JAX backend, which must happen
before anything imports Keras (else Keras starts on TensorFlow)."""

import fp8exp  # noqa: F401
