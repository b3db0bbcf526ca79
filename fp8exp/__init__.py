"""fp8exp: should I train this Keras Transformer in FP8, and what does it cost me?"""

from fp8exp import startup

startup.configure()

__version__ = "0.1.0"
