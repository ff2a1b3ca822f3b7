#!/usr/bin/env bash
# The test command: everything CI runs, in one place. Every stage runs even when an
# earlier one failed, and the last thing printed is one summary:
#   N passed, N failed, N skipped
# followed by each skipped test (or stage) with its reason. A test that cannot run here
# records itself through `common::skip` / `crate::test_skip::skip`, which append to
# $HETCCL_TEST_SKIP_LOG; the harness counts it as passed, so it is taken off the passes.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HETCCL_TEST_SKIP_LOG="$work/skipped"
: >"$HETCCL_TEST_SKIP_LOG"
: >"$work/log"
skipped_stages=()
failed_stages=()

# stage NAME COMMAND...: runs it, keeps its output for the summary.
stage() {
    local name=$1
    shift
    echo "== $name"
    local before
    before=$(wc -l <"$work/log")
    "$@" 2>&1 | tee -a "$work/log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        # A stage that failed without a failing test (a build error) still counts once.
        if ! tail -n +"$((before + 1))" "$work/log" | grep -qE '^test result: FAILED'; then
            failed_stages+=("$name (exit $rc before any test failed)")
        else
            failed_stages+=("$name (exit $rc)")
        fi
    fi
}

# Every package's binaries first: tests of one package start the others' (the trainer's
# tests run `hetccl run`, the launcher's tests run `hetccl-bert`), which cargo builds only
# for the package under test.
stage "cargo build --workspace --bins" cargo build --release --workspace --bins
# --no-fail-fast: one failing test file must not hide the results of the ones after it.
stage "cargo test --workspace (default features)" cargo test --release --workspace --no-fail-fast -- --test-threads=2

if command -v mpirun >/dev/null; then
    stage "cargo test --features mpi" cargo test --release -p hetccl --features mpi --test mpi -- --test-threads=1
else
    skipped_stages+=("stage: cargo test --features mpi	mpirun is not installed (apt install openmpi-bin libopenmpi-dev)")
fi

if command -v nvcc >/dev/null || python3 -c "import nvidia, os, sys; sys.exit(0 if os.path.exists(os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin', 'nvcc')) else 1)" 2>/dev/null; then
    stage "cargo test --features cuda (kernels compile; ptxas register/spill report above; GPU tests skip without a GPU)" \
        cargo test --release -p hetccl -p hetccl-tools --features hetccl-tools/cuda \
        --test gpu_kernels --test gpu_collectives -- --test-threads=1
    # The trainer's kernels, cuBLAS products and model against their CPU twins.
    stage "cargo test -p hetccl-trainer --features cuda (GPU tests skip without a GPU)" \
        cargo test --release -p hetccl-trainer --features cuda \
        --test gpu_bert_kernels --test gpu_bert_matmul --test gpu_bert_model -- --test-threads=1
    # The device layer's unit tests, and the settings that exist only with `cuda`.
    stage "cargo test --features cuda --lib device:: config::tests::device_" \
        cargo test --release -p hetccl --features cuda --lib -- device:: config::tests::device_ \
        --test-threads=1
else
    skipped_stages+=("stage: cargo test --features cuda	nvcc not found (scripts/install-nvcc.sh installs it)")
fi

# "test result: ok. 12 passed; 0 failed; 1 ignored; ..." once per test binary.
read -r ran failed < <(grep -E '^test result: ' "$work/log" |
    sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/' |
    awk '{p += $1; f += $2} END {print p + 0, f + 0}')
stage_failures=0
for s in "${failed_stages[@]}"; do
    case "$s" in *"before any test failed"*) stage_failures=$((stage_failures + 1)) ;; esac
done
failed=$((failed + stage_failures))
nskip=$(($(wc -l <"$HETCCL_TEST_SKIP_LOG") + ${#skipped_stages[@]}))
passed=$((ran - $(wc -l <"$HETCCL_TEST_SKIP_LOG")))

echo
echo "== summary"
if [ ${#failed_stages[@]} -gt 0 ]; then
    echo "failed:"
    grep -E '^test .* \.\.\. FAILED$' "$work/log" | sed -E 's/^test (.*) \.\.\. FAILED$/  \1/'
    for s in "${failed_stages[@]}"; do echo "  stage: $s"; done
fi
echo "$passed passed, $failed failed, $nskip skipped"
{
    sort "$HETCCL_TEST_SKIP_LOG"
    for s in "${skipped_stages[@]}"; do echo "$s"; done
} | awk -F '\t' 'NF { printf "  skipped %s: %s\n", $1, $2 }'
[ ${#failed_stages[@]} -eq 0 ]
