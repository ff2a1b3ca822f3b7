#!/usr/bin/env bash
# GPU check for a machine with the CUDA driver but no Rust toolchain and no network:
# runs the executables that scripts/build-gpu-bin.sh left in gpu-bin/ (every GPU test
# binary, the trainer's kernel, product and model tests among them, the device-collective check under the launcher with 2 and 4 ranks, a timed
# sweep of the device all-reduce over both paths, the C API's device calls and the PyTorch
# backend on CUDA tensors, the hierarchical device all-reduce
# against the flat staged one on 2 pretend hosts x 2 ranks, then hetccl-kernel-bench) and
# prints a short table last.
#
#   bash scripts/gpu-check.sh [BIN_DIR] [bench args...]     (defaults: gpu-bin, --sizes 64,256)
#
# gpu-bin/ is git-ignored: copy it along with the checkout (about 35 MiB stripped).
# Logs go to $OUT if set (else gpu-check-logs/). Each step is cut off after
# $GPU_CHECK_STEP_TIMEOUT seconds (default 150), so one hung step cannot eat the rest.
# GPU_CHECK_TORCH=0 leaves out the PyTorch backend's CUDA tests (they compile the
# extension there first, about a minute). With GPU_CHECK_SANITIZE=1 it also runs the
# kernel tests under compute-sanitizer's memcheck and initcheck, and a 2-rank
# device-collective check under memcheck.
# Exit status: 0 when every test passed and the bench ran.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-gpu-bin}
shift || true
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--sizes 64,256)
LOG=${OUT:-gpu-check-logs}
STEP=${GPU_CHECK_STEP_TIMEOUT:-150}
mkdir -p "$LOG"

if [ ! -d "$BIN" ]; then
    echo "no $BIN/: run scripts/build-gpu-bin.sh on a machine with Rust first" >&2
    exit 2
fi
[ -f "$BIN/BUILD_INFO" ] && cat "$BIN/BUILD_INFO"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not available)"

# cuBLAS (the trainer's products) comes from the Python environment's NVIDIA wheels when
# the system has none: put the wheel's library directory on the loader's path.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
    CUBLAS_DIR=$(python3 -c 'import nvidia, glob, os; d = [os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "*", "lib", "libcublas.so*"))]; print(d[0] if d else "")' 2>/dev/null)
    if [ -n "$CUBLAS_DIR" ]; then
        export LD_LIBRARY_PATH="$CUBLAS_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "cuBLAS from $CUBLAS_DIR"
    else
        echo "(no cuBLAS found: the trainer's product tests will skip)"
    fi
fi

status=0
rows=()
# One finished step: its table row, and its log's tail when it failed.
step_done() { # name, rc, result, log
    [ "$2" -ne 0 ] && status=1
    rows+=("$(printf '%-28s rc=%-3s %s' "$1" "$2" "${3:-no result line}")")
    if [ "$2" -ne 0 ]; then
        echo "---- $1 failed; last lines:"
        tail -n 30 "$4"
    fi
}
# Tests that start other executables (gpu_collectives) look for them here.
export HETCCL_BIN_DIR
HETCCL_BIN_DIR=$(cd "$BIN" && pwd)
for t in "$BIN"/gpu*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    timeout "$STEP" "$t" --test-threads=1 --nocapture >"$LOG/$name.log" 2>&1
    rc=$?
    result=$(grep -E '^test result:' "$LOG/$name.log" | tail -n 1)
    # A test that skips prints `SKIPPED <binary>::<test>: <reason>` (common::skip).
    skipped=$(grep -c 'SKIPPED [^ ]*: ' "$LOG/$name.log")
    [ $rc -ne 0 ] && status=1
    note=""
    [ "$skipped" -gt 0 ] && note=" ($skipped skipped: $(grep -o -m1 'SKIPPED [^ ]*: .*' "$LOG/$name.log" | sed 's/^SKIPPED [^ ]*: //'))"
    rows+=("$(printf '%-28s rc=%-3s %s%s' "$name" "$rc" "${result:-no result line}" "$note")")
    if [ $rc -ne 0 ]; then
        echo "---- $name failed; last lines:"
        tail -n 30 "$LOG/$name.log"
    fi
done

# Device collectives under the launcher; ranks share GPUs when there are fewer GPUs.
for n in 2 4; do
    name="hetccl-gpu-check n=$n"
    log="$LOG/hetccl-gpu-check-n$n.log"
    if [ -x "$BIN/hetccl" ] && [ -x "$BIN/hetccl-gpu-check" ]; then
        HETCCL_TIMEOUT=60 timeout "$STEP" "$BIN/hetccl" run -n "$n" -- "$BIN/hetccl-gpu-check" >"$log" 2>&1
        rc=$?
    else
        echo "hetccl or hetccl-gpu-check missing from $BIN" >"$log"
        rc=127
    fi
    [ $rc -ne 0 ] && status=1
    result=$(grep -m1 '^\[rank 0\] rank 0/[0-9]*: [0-9]* checks passed' "$log" | sed 's/^\[rank 0\] //')
    [ -z "$result" ] && result=$(grep -o -m1 'skipping:.*' "$log")
    [ -z "$result" ] && result=$(grep -o -m1 'hetccl-gpu-check: .*' "$log")
    speed=$(grep -o -m1 'all_reduce f32 sum .*busbw [0-9.]* GB/s' "$log")
    rows+=("$(printf '%-28s rc=%-3s %s%s' "$name" "$rc" "${result:-no result line}" "${speed:+; $speed}")")
    if [ $rc -ne 0 ]; then
        echo "---- $name failed; last lines:"
        tail -n 30 "$log"
    fi
done

# The C API's device calls (hetcclDevice*) on raw pointers and a stream of the program's.
name="hetccl-gpu-check --capi n=2"
log="$LOG/hetccl-gpu-check-capi.log"
if [ -x "$BIN/hetccl" ] && [ -x "$BIN/hetccl-gpu-check" ]; then
    HETCCL_TIMEOUT=60 timeout "$STEP" "$BIN/hetccl" run -n 2 -- "$BIN/hetccl-gpu-check" --capi >"$log" 2>&1
    rc=$?
else
    echo "hetccl or hetccl-gpu-check missing from $BIN" >"$log"
    rc=127
fi
result=$(grep -m1 '^\[rank 0\] rank 0/[0-9]*: [0-9]* C API checks passed' "$log" | sed 's/^\[rank 0\] //')
[ -z "$result" ] && result=$(grep -o -m1 'skipping:.*' "$log")
[ -z "$result" ] && result=$(grep -o -m1 'hetccl-gpu-check: .*' "$log")
step_done "$name" "$rc" "$result" "$log"

# examples/c/device_allreduce.c, built here with the C compiler against CUDA's runtime
# (beside nvcc) and the cuda build of libhetccl.
name="C example device_allreduce"
log="$LOG/device-allreduce-example.log"
NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -n 1)
CUDA_HOME=${NVCC:+$(dirname "$(dirname "$NVCC")")}
CUDART=$(ls "$CUDA_HOME"/lib64/libcudart.so "$CUDA_HOME"/lib/libcudart.so* 2>/dev/null | head -n 1)
if [ -f "$BIN/libhetccl.so" ] && [ -n "$CUDART" ] && command -v cc >/dev/null; then
    LIBDIR=$(cd "$BIN" && pwd)
    if cc -std=c11 examples/c/device_allreduce.c -I bindings -I "$CUDA_HOME/include" \
        -L "$LIBDIR" -lhetccl "$CUDART" -Wl,-rpath,"$LIBDIR" -Wl,-rpath,"$(dirname "$CUDART")" \
        -o "$LOG/device_allreduce" >"$log" 2>&1; then
        HETCCL_TIMEOUT=60 timeout "$STEP" "$BIN/hetccl" run -n 2 -- "$LOG/device_allreduce" >>"$log" 2>&1
        rc=$?
    else
        rc=1
    fi
    result=$(grep -o -m1 'rank 0/[0-9]*: device all-reduce .*' "$log")
    [ -z "$result" ] && result=$(grep -v '^hetccl hang report' "$log" | grep -m1 -o 'rank 0: .*')
else
    echo "no $BIN/libhetccl.so, no CUDA runtime beside nvcc, or no cc" >"$log"
    rc=127
    result=$(cat "$log")
fi
step_done "$name" "$rc" "$result" "$log"

# The PyTorch backend on CUDA tensors, with the cuda build of libhetccl in $BIN (the
# extension is compiled there against the machine's torch).
name="torch backend, CUDA tensors"
log="$LOG/torch-backend-cuda.log"
if [ "${GPU_CHECK_TORCH:-1}" = 0 ]; then
    echo "skipped: GPU_CHECK_TORCH=0" >"$log"
    rc=0
    result=$(cat "$log")
elif [ -f "$BIN/libhetccl.so" ] && python3 -c 'import torch, transformers' 2>/dev/null; then
    (cd python/tests && HETCCL_LIB_DIR="$HETCCL_BIN_DIR" HETCCL_TIMEOUT=60 timeout $((2 * STEP)) \
        python3 -m unittest -v test_backend_cuda) >"$log" 2>&1
    rc=$?
    result=$(grep -E '^(Ran [0-9]+ tests|OK|FAILED)' "$log" | paste -sd ' ' -)
    # Skipped is not passed: here it means PyTorch sees no GPU.
    if [ $rc -eq 0 ] && grep -q 'skipped' "$log"; then rc=2; fi
else
    echo "no $BIN/libhetccl.so, or no torch and transformers for python3" >"$log"
    rc=127
    result=$(cat "$log")
fi
step_done "$name" "$rc" "$result" "$log"

# compute-sanitizer: out-of-bounds and misaligned accesses (memcheck), reads of device
# memory nothing wrote (initcheck); each run exits 9 on any finding.
if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ]; then
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    for tool in memcheck initcheck; do
        log="$LOG/sanitize-$tool.log"
        if [ -n "$SAN" ]; then
            timeout "$STEP" "$SAN" --tool "$tool" --error-exitcode 9 "$BIN/gpu_kernels" --test-threads=1 >"$log" 2>&1
            rc=$?
            # The trainer's kernels (kernels/bert.cu) index by token ids and row lists.
            timeout "$STEP" "$SAN" --tool "$tool" --error-exitcode 9 "$BIN/gpu_bert_kernels" --test-threads=1 >>"$log" 2>&1
            rc2=$?
            [ $rc -eq 0 ] && rc=$rc2
            if [ "$tool" = memcheck ]; then
                HETCCL_TIMEOUT=120 timeout "$STEP" "$BIN/hetccl" run -n 2 -- "$SAN" --tool memcheck \
                    --error-exitcode 9 "$BIN/hetccl-gpu-check" --counts 1,1000,4099 >>"$log" 2>&1
                rc2=$?
                [ $rc -eq 0 ] && rc=$rc2
            fi
        else
            echo "compute-sanitizer not found" >"$log"
            rc=127
        fi
        [ $rc -ne 0 ] && status=1
        summary=$(grep -h -o 'ERROR SUMMARY: [0-9]* errors*' "$log" | sort | uniq -c | tr -s ' ' | paste -sd ';' -)
        rows+=("$(printf '%-28s rc=%-3s %s' "sanitize $tool" "$rc" "${summary:-no summary line}")")
    done
fi

# Device all-reduce and reduce-scatter timings, 2 ranks (all ranks share GPU 0 on a
# 1-GPU host): the IPC path with device fences (one shot, as chosen on a shared GPU,
# then forced to two shots), with host fences, and the staged path. Each run is named by
# its settings; the reduce-scatter has one form, timed in every run.
SWEEP=256,65536,1048576,16777216,67108864
SWEEPS=(
    "ipc-device ipc HETCCL_DEVICE_FENCE=device"
    "ipc-device-2shot ipc HETCCL_DEVICE_FENCE=device HETCCL_DEVICE_ONE_SHOT_BYTES=0"
    "ipc-host ipc HETCCL_DEVICE_FENCE=host"
    "ipc-host-2shot ipc HETCCL_DEVICE_FENCE=host HETCCL_DEVICE_ONE_SHOT_BYTES=0"
    "staged staged"
)
for sweep in "${SWEEPS[@]}"; do
    read -r label path settings <<<"$sweep"
    # shellcheck disable=SC2086 # the settings are separate VAR=value words
    env HETCCL_TIMEOUT=60 $settings timeout "$STEP" "$BIN/hetccl" run -n 2 -- \
        "$BIN/hetccl-gpu-check" --path "$path" --counts 1,1000 --time "$SWEEP" --iters 10 \
        >"$LOG/sweep-$label.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    rows+=("$(printf '%-28s rc=%-3s %s' "sweep $label n=2" "$rc" "${settings:-defaults}")")
done

# Hierarchical against flat staged across hosts: 4 ranks on 2 pretend hosts
# (HETCCL_NODE_ID; all share this host's GPUs), a 64 MiB f32 all-reduce, median of 5.
# The links between the pretend hosts are this host's (loopback), not rate-limited: the
# launcher's ranks share one network namespace, so the 1 Gbit/s targets are not
# measured here.
HIERS=(
    "hier-2x2 auto"
    "flat-2x2 staged"
)
for h in "${HIERS[@]}"; do
    read -r label path <<<"$h"
    env HETCCL_TIMEOUT=60 timeout "$STEP" "$BIN/hetccl" run -n 4 -- \
        "$BIN/hetccl-gpu-check" --path "$path" --pretend-nodes 2 --counts 8 --time 16777216 \
        --iters 5 >"$LOG/$label.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    result=$(grep -m1 '^\[rank 0\] rank 0/[0-9]*: [0-9]* checks passed' "$LOG/$label.log" | sed 's/^\[rank 0\] //')
    rows+=("$(printf '%-28s rc=%-3s %s' "$label n=4 (2 pretend hosts)" "$rc" "${result:-no result line}")")
    if [ $rc -ne 0 ]; then
        echo "---- $label failed; last lines:"
        tail -n 30 "$LOG/$label.log"
    fi
done

timeout "$STEP" "$BIN/hetccl-kernel-bench" "${BENCH_ARGS[@]}" >"$LOG/kernel-bench.log" 2>&1
brc=$?
grep -v '^SUMMARY' "$LOG/kernel-bench.log"
[ $brc -ne 0 ] && status=1

echo
echo "== gpu-check summary =="
for r in "${rows[@]}"; do echo "$r"; done
echo "hetccl-kernel-bench          rc=$brc"
printf '%-17s %-15s %5s %10s %12s %10s\n' run collective ranks elements median_us busbw_GB/s
for sweep in "${SWEEPS[@]}"; do
    read -r label _ <<<"$sweep"
    grep -o '[a-z_]* f32 sum [0-9]* elements on [0-9]* ranks ([a-z-]*): [0-9.]* us.*busbw [0-9.]*' \
        "$LOG/sweep-$label.log" | sed 's/[(),:]/ /g' |
        awk -v l="$label" '{printf "%-17s %-15s %5s %10s %12s %10s\n", l, $1, $7, $4, $10, $NF}'
done
for h in "${HIERS[@]}"; do
    read -r label _ <<<"$h"
    grep -o 'all_reduce f32 sum [0-9]* elements on [0-9]* ranks ([a-z-]*): [0-9.]* us.*busbw [0-9.]*' \
        "$LOG/$label.log" | sed 's/[(),:]/ /g' |
        awk -v l="$label" '{printf "%-17s %-15s %5s %10s %12s %10s\n", l, $1, $7, $4, $10, $NF}'
done
us() { grep -o -m1 'all_reduce f32 sum 16777216 elements on 4 ranks ([a-z-]*): [0-9.]* us' "$LOG/$1.log" | grep -o '[0-9.]* us$' | cut -d' ' -f1; }
hier_us=$(us hier-2x2)
flat_us=$(us flat-2x2)
if [ -n "$hier_us" ] && [ -n "$flat_us" ]; then
    awk -v h="$hier_us" -v f="$flat_us" 'BEGIN { printf "64 MiB across 2 pretend hosts, unlimited links: flat/hier = %.2fx (target >= 1.3x)\n", f / h }'
fi
grep -h -o -m1 'rank 0: hierarchical all_reduce of .*' "$LOG/hier-2x2.log" 2>/dev/null
if [ $brc -eq 0 ]; then
    printf '%-34s %6s %9s %9s\n' kernel MiB GB/s %memcpy
    grep '^SUMMARY ' "$LOG/kernel-bench.log" | tail -n +2 | while read -r _ k mib gbs pct; do
        printf '%-34s %6s %9s %8s%%\n' "$k" "$mib" "$gbs" "$pct"
    done
fi
exit $status
