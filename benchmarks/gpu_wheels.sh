#!/usr/bin/env bash
# Download, as wheels, the pure-Python packages the GPU kit needs on an offline GPU machine
# that already has a CUDA JAX, numpy, h5py, rich, regex, PyYAML, absl-py and ml-dtypes.
# Usage: benchmarks/gpu_wheels.sh [DEST] [PYTHON_VERSION]    (default .whl, 3.12)
set -euo pipefail
dest=${1:-.whl}
py=${2:-3.12}
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest" \
  keras==3.15.1 keras-hub==0.32.0 hydra-core==1.3.8 omegaconf==2.3.1 namex==0.1.0 optree==0.20.0
# Hydra's parser runtime is published as a source archive only; it is pure Python, so build its wheel here.
python3 -m pip wheel --quiet --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
du -sh "$dest"
