#!/usr/bin/env bash
# The test command: everything CI runs, in one place.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "== cargo test (default features)"
cargo test --release -- --test-threads=2

if command -v mpirun >/dev/null; then
    echo "== cargo test --features mpi"
    cargo test --release --features mpi --test mpi -- --test-threads=1
else
    echo "== skipping the mpi feature: mpirun is not installed"
fi
