#!/usr/bin/env bash
# Installs PyTorch (with Gloo), transformers and ninja into a virtual environment, for the
# hetccl torch.distributed backend (python/hetccl_torch) and its tests:
#
#   scripts/install-torch.sh [VENV]        (default: /tmp/hetccl-torch-venv)
#   HETCCL_TORCH_PYTHON=VENV/bin/python cargo test --release -p hetccl-tools --test torch_backend
#
# PyPI's Linux torch wheel links the CUDA libraries even for CPU use, so they come too
# (about 4.5 GiB installed). Measured here: about 2.5 minutes at ~250 MB/s. Nothing is
# left in pip's cache (--no-cache-dir).
set -euo pipefail
venv="${1:-/tmp/hetccl-torch-venv}"
python3 -m venv "$venv"
pip=("$venv/bin/pip" install --no-cache-dir)
"${pip[@]}" torch
"${pip[@]}" transformers ninja
"$venv/bin/python" -c "import torch, torch.distributed as d; assert d.is_gloo_available(); print('torch', torch.__version__)"
echo "HETCCL_TORCH_PYTHON=$venv/bin/python"
