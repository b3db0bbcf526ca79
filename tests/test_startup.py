"""TensorFlow's C++ start-up notices stay off the terminal; anything else printed while it loads
(a real warning) still reaches stderr."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

NOTICES = ("oneDNN custom operations", "Could not find cuda drivers", "absl::InitializeLog", "cpu_feature_guard")


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_real_tensorflow_loads_without_its_notices():
    result = python("import fp8exp, tensorflow; print('loaded')")
    assert result.returncode == 0 and result.stdout.strip() == "loaded", result.stderr
    assert not [line for line in result.stderr.splitlines() if any(notice in line for notice in NOTICES)], result.stderr


def test_a_real_warning_during_the_import_still_shows(tmp_path):
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, warnings\n"
        "os.write(2, b'I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'W0000 a real C++ warning\\n')\n"
        "warnings.warn('a real Python warning')\n")
    result = python("import fp8exp, tensorflow", PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "oneDNN" not in result.stderr
    assert "W0000 a real C++ warning" in result.stderr and "a real Python warning" in result.stderr
