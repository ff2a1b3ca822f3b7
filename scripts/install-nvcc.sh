#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI wheels (no CUDA toolkit, no root needed beyond pip's own),
# for `cargo build --features cuda`. All five versions are pinned together: 13.0 matches
# the GPU machines' driver (newer PTX would not load there), and a newer nvidia-nvvm
# alone breaks ptxas. build.rs finds the result at
# <site-packages>/nvidia/cu13/bin/nvcc; this script prints that path last.
set -euo pipefail

PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85

NVCC="$("$PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvcc"))')"
"$NVCC" --version | tail -n 2
echo "$NVCC"
