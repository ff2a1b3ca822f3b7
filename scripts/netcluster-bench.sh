#!/usr/bin/env bash
# All-reduce timings on the simulated cluster (scripts/netcluster.sh), as in
# docs/PERFORMANCE.md ("Simulated cluster"). For each case: RUNS processes x ITERS timed f32 sums
# (after one untimed call each), per algorithm, interleaved so that load from other
# work on the host hits every algorithm alike; prints the median, min and max of all
# RUNS x ITERS timings next to the lower bound 2(N-1)/N * S / B_node.
#
#   scripts/netcluster-bench.sh [--runs 3] [--iters 3] [CASE...]
#   CASE: name:ranks:rate:bytes:algos, e.g. 2x2:2,2:1gbit:64M:hier,ring,auto,mpi
#   (algos: HETCCL_ALGO values, and mpi for Open MPI's MPI_Allreduce through
#   netcluster.sh mpirun)
#
# Needs root (namespaces) and target/release/examples/allreduce_time
# (cargo build --release --example allreduce_time).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=3 ITERS=3
while [[ ${1:-} == --* ]]; do
    case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
CASES=("$@")
((${#CASES[@]})) || CASES=(
    "2x2:2,2:1gbit:64M:hier,ring,auto,mpi"
    "3+2+1:3,2,1:1gbit:64M:hier,ring,auto,mpi"
    "4x1:1,1,1,1:1gbit:64M:ring,hier,auto,mpi"
    "2x2-100M:2,2:100mbit:8M:hier,ring,auto,mpi"
)
BIN=target/release/examples/allreduce_time
[[ -x $BIN ]] || { echo "build it first: cargo build --release --example allreduce_time" >&2; exit 2; }
# "mpi" in a case's algorithm list times Open MPI's MPI_Allreduce (if mpicc is here).
MPIBIN=target/mpi_allreduce_time
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
    mpicc -O2 -o "$MPIBIN" scripts/mpi_allreduce_time.c || exit 1
fi
export NETCLUSTER_PREFIX=${NETCLUSTER_PREFIX:-hccb}
NC=scripts/netcluster.sh
trap '$NC down' EXIT

bytes_of() { # 64M -> 67108864
    local s=$1
    case $s in
    *K) echo $((${s%K} << 10)) ;;
    *M) echo $((${s%M} << 20)) ;;
    *G) echo $((${s%G} << 30)) ;;
    *) echo "$s" ;;
    esac
}

printf "%-9s %-8s %-7s %-5s %9s %9s %9s %9s %8s\n" case rate size algo median min max bound ratio
for c in "${CASES[@]}"; do
    IFS=: read -r name ranks rate size algos <<<"$c"
    IFS=, read -r -a per_node <<<"$ranks"
    nodes=${#per_node[@]}
    $NC down
    $NC up "$nodes" --rate "$rate" >/dev/null || exit $?
    bps=$(awk -v r="${rate,,}" 'BEGIN{n=r+0; if(r~/gbit/)n*=1e9; else if(r~/mbit/)n*=1e6; else if(r~/kbit/)n*=1e3; print n/8}')
    bound=$(awk -v N="$nodes" -v S="$(bytes_of "$size")" -v B="$bps" 'BEGIN{printf "%.4f", 2*(N-1)/N*S/B}')
    declare -A times=()
    IFS=, read -r -a alist <<<"$algos"
    for ((r = 0; r < RUNS; r++)); do
        for a in "${alist[@]}"; do
            if [[ $a == mpi ]]; then
                out=$($NC mpirun --ranks "$ranks" -- "$MPIBIN" "$(bytes_of "$size")" "$ITERS" 2>&1) ||
                    { echo "$name $a failed:" >&2; echo "$out" >&2; exit 1; }
                t=$(echo "$out" | awk '/^iteration/{printf "%s ", $3}')
            else
                out=$(HETCCL_ALGO=$a $NC run --ranks "$ranks" -- "$BIN" "$size" "$ITERS" 2>&1) ||
                    { echo "$name $a failed:" >&2; echo "$out" >&2; exit 1; }
                t=$(echo "$out" | awk '/\[rank 0\] iteration/{printf "%s ", $5}')
            fi
            times[$a]+="$t"
        done
    done
    for a in "${alist[@]}"; do
        echo "${times[$a]}" | tr ' ' '\n' | grep . | sort -g | awk -v name="$name" -v rate="$rate" \
            -v size="$size" -v a="$a" -v b="$bound" '
            {v[NR]=$1} END{m=v[int((NR+1)/2)];
            printf "%-9s %-8s %-7s %-5s %9.4f %9.4f %9.4f %9.4f %8.2f\n", name, rate, size, a, m, v[1], v[NR], b, m/b}'
    done
    unset times
done
