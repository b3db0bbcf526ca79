"""The networks fp8exp trains, built under whatever dtype policy is global at call time.

classifier.py: the reference Keras FP8 example's Transformer classifier (`model=tiny|small|base|large`).
families.py: keras-hub backbones from config (`model=<gpt2|llama|gemma|bert>_<tiny|small|base>`),
randomly initialised or loaded from a preset directory on disk (`model.preset=PATH`), as a causal LM
(decoders) or with a classification head (any family)."""
