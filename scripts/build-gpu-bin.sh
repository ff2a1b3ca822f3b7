#!/usr/bin/env bash
# Builds the GPU test and benchmark executables with `--features cuda` (plus the `hetccl`
# launcher and `hetccl-gpu-check`, which the multi-process GPU tests start) and copies them,
# stripped, into gpu-bin/ (git-ignored), for scripts/gpu-check.sh on a GPU machine that
# has the CUDA driver but no Rust toolchain or network. The executables load libcuda at
# run time and otherwise need only the C library of this build machine's vintage.
set -euo pipefail
cd "$(dirname "$0")/.."

# build.rs finds nvcc on its own (NVCC, PATH, the pip wheel); install the wheel if none.
if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null 2>&1 &&
    ! python3 -c 'import nvidia, os, sys; sys.exit(not os.path.isfile(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvcc")))' 2>/dev/null; then
    bash scripts/install-nvcc.sh
fi

OUT_DIR=gpu-bin
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"

# The launcher and the device-collective check run beside the tests: gpu_collectives
# finds them next to its own executable. All three are the tools' package.
cargo build --release -p hetccl-tools --features cuda --bin hetccl-kernel-bench --bin hetccl-gpu-check --bin hetccl
for b in hetccl-kernel-bench hetccl-gpu-check hetccl; do
    cp "target/release/$b" "$OUT_DIR/"
done
# The C library with the device calls, for the PyTorch backend's CUDA tests
# (python/tests/test_backend_cuda.py, which builds the extension against it there).
cargo build --release -p hetccl --features cuda --lib
cp target/release/libhetccl.so "$OUT_DIR/"

# The GPU tests of the library (tests/), the tools (tools/tests/) and the trainer
# (trainer/tests/); the tools' and the trainer's `cuda` features turn on the library's.
tests=()
for f in tests/gpu*.rs tools/tests/gpu*.rs trainer/tests/gpu*.rs; do
    tests+=(--test "$(basename "$f" .rs)")
done
# Each test executable's path comes from cargo's JSON messages.
cargo test --release -p hetccl -p hetccl-tools -p hetccl-trainer \
    --features hetccl-tools/cuda,hetccl-trainer/cuda --no-run "${tests[@]}" \
    --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], os.path.join(sys.argv[1], m["target"]["name"]))
        print("copied", m["target"]["name"])
' "$OUT_DIR"

for f in "$OUT_DIR"/*; do
    strip --strip-debug "$f" 2>/dev/null || true
done
{
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version 2>&1 | head -n 1)"
} >"$OUT_DIR/BUILD_INFO"
ls -la "$OUT_DIR"
