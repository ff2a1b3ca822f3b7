#!/usr/bin/env bash
# Installs the CUDA 12.8 compiler wheels for the Volta (sm_70) build into a prefix of
# their own (default target/cuda12, where build.rs and tests/kernel_archs.rs look; or
# $1), never into site-packages: the CUDA 13 wheels there stay as they are. The CUDA 12
# wheels carry no nvcc, only NVRTC (nvidia-cuda-nvrtc-cu12), ptxas
# (nvidia-cuda-nvcc-cu12) and the headers (nvidia-cuda-runtime-cu12), about 100 MB;
# scripts/nvrtc-compile.py drives them. 12.8 matches cudarc's `cuda-12080` bindings,
# which `--features hetccl/cuda12` selects.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${1:-target/cuda12}
PY=${PYTHON:-python3}
# --target replaces the prefix's `nvidia` package as a whole: install the three at once.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$PREFIX" \
    nvidia-cuda-nvrtc-cu12==12.8.93 \
    nvidia-cuda-nvcc-cu12==12.8.93 \
    nvidia-cuda-runtime-cu12==12.8.90
"$PREFIX/nvidia/cuda_nvcc/bin/ptxas" --version | tail -n 1
echo "$PREFIX"
