#!/usr/bin/env bash
# What HETCCL_TRACE costs in wall-clock time, trace off and on alternated launch by
# launch, so that both see the same minutes of the machine:
#
#   scripts/trace-wallclock.sh [--pairs 5] [--sizes "1M 64M"] [--ranks 4]
#
# Each launch is `hetccl run -n RANKS -- hetccl-perf -b S -e S` of one size (200
# iterations at 1 MiB and below, 10 above), over shared memory and over TCP
# (HETCCL_SHM_DISABLE=1); "on" writes every rank's trace into a temporary directory.
# Printed: every launch's median time per call (rank 0, out-of-place / in-place, µs),
# then per link and size the median over the launches, off and on, and on/off - 1.
# The instruction count (scripts/trace-overhead.sh) is the measure that load does not
# move; this says whether the wall clock shows any more than that.
set -euo pipefail
cd "$(dirname "$0")/.."

pairs=5
sizes="1M 64M"
ranks=4
while [ $# -gt 0 ]; do
    case "$1" in
    --pairs) pairs="$2"; shift 2 ;;
    --sizes) sizes="$2"; shift 2 ;;
    --ranks) ranks="$2"; shift 2 ;;
    *) echo "trace-wallclock.sh: unknown argument $1 (accepted: --pairs N, --sizes LIST, --ranks N)" >&2; exit 2 ;;
    esac
done

cargo build --release -q -p hetccl-tools --bin hetccl --bin hetccl-perf
launcher=target/release/hetccl
perf=target/release/hetccl-perf
work=$(mktemp -d /tmp/hetccl-trace-wallclock.XXXXXX)
trap 'rm -rf "$work"' EXIT

iters_for() {
    case "$1" in
    *G | [0-9]*[0-9][0-9]M | [2-9]M) echo 10 ;;
    *) echo 200 ;;
    esac
}

# One launch; prints "OOP INPLACE" (median µs per call, rank 0).
launch() {
    local link=$1 size=$2 trace=$3 n
    n=$(iters_for "$size")
    local env=(HETCCL_SHM_DISABLE=$([ "$link" = tcp ] && echo 1 || echo 0))
    if [ "$trace" = on ]; then
        env+=(HETCCL_TRACE="$work/t-%r.json")
    fi
    env "${env[@]}" "$launcher" run -n "$ranks" -- "$perf" -b "$size" -e "$size" -n "$n" -w 3 -c 0 2>&1 |
        awk '$1 == "[rank" && $2 == "0]" && $3 ~ /^[0-9]+$/ { print $16, $17 }'
    rm -f "$work"/t-*.json
}

echo "# HETCCL_TRACE wall clock, $ranks ranks, alternated off/on, $(date -u '+%Y-%m-%d %H:%M') UTC, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-4s %6s %5s %4s %12s %12s\n' link size pair mode oop_us inplace_us
results="$work/results"
: >"$results"
for link in shm tcp; do
    for size in $sizes; do
        for p in $(seq 1 "$pairs"); do
            for mode in off on; do
                read -r oop inp < <(launch "$link" "$size" "$mode")
                printf '%-4s %6s %5s %4s %12s %12s\n' "$link" "$size" "$p" "$mode" "$oop" "$inp"
                echo "$link $size $mode $oop $inp" >>"$results"
            done
        done
    done
done
echo "# medians over the launches (out-of-place / in-place µs), and on/off - 1"
for link in shm tcp; do
    for size in $sizes; do
        med() {
            awk -v l="$link" -v s="$size" -v m="$1" -v c="$2" '$1 == l && $2 == s && $3 == m { print $c }' "$results" |
                sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
        }
        off_o=$(med off 4) off_i=$(med off 5) on_o=$(med on 4) on_i=$(med on 5)
        awk -v l="$link" -v s="$size" -v a="$off_o" -v b="$off_i" -v c="$on_o" -v d="$on_i" \
            'BEGIN { printf "%-4s %6s off %10.2f / %10.2f   on %10.2f / %10.2f   on/off-1 %+6.1f%% / %+6.1f%%\n", l, s, a, b, c, d, (c / a - 1) * 100, (d / b - 1) * 100 }'
    done
done
