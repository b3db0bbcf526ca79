"""What every fp8exp process sets up before Keras loads: the JAX backend, and TensorFlow (only a
text-pipeline dependency) kept quiet. TensorFlow's C++ libraries print start-up notices straight to
file descriptor 2 when they load (oneDNN, "Could not find cuda drivers", CPU instructions), twice
per process, which no logging setting reaches. So the first `import tensorflow`, whoever makes it,
runs with descriptor 2 captured; afterwards everything captured except those notices is written
to stderr, so real warnings still show."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

CHATTER = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|oneDNN custom operations are on"
    r"|Could not find cuda drivers|cpu_feature_guard\.cc|To enable the following instructions:"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|TF-TRT Warning")


@contextlib.contextmanager
def filtered_stderr(chatter: re.Pattern = CHATTER) -> Iterator[None]:
    """Capture descriptor 2 (C++ and Python alike) and pass on every line `chatter` does not match."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a daemon started with 2>&-): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                if sys.stderr is not None:
                    sys.stderr.flush()
            except (OSError, ValueError):
                pass
            finally:  # descriptor 2 comes back whatever happened above
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not chatter.search(line)]
            if kept and sys.stderr is not None:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Wraps the loading of the `tensorflow` package in `filtered_stderr`, once."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self.done:
            return None
        self.done = True  # a flag, not removal: another thread may be walking sys.meta_path
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            load = spec.loader.exec_module

            def quiet_load(module):
                with filtered_stderr():
                    load(module)

            spec.loader.exec_module = quiet_load
        return spec


def configure() -> None:
    # Keras reads its backend once, at first import; fp8exp is a JAX tool.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    # TensorFlow stays off the accelerator's logs, and its Python-side logging quiet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlow())
