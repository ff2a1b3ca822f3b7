#!/usr/bin/env bash
# What HETCCL_TRACE costs per collective, in instructions (callgrind), so that the load
# of the machine does not enter the figure.
#
#   scripts/trace-overhead.sh [--base BIN] [--sizes "1M 64M"] [--iters "8 2"]
#
# Four ranks (`hetccl run -n 4`) run examples/trace_overhead: nothing but N f32 sum
# all-reduces. Each rank runs under callgrind twice, with N and 2N calls; the
# difference of its instruction totals over N is its cost per call, with the setup
# (init, clock alignment, exit) cancelled out. The table gives the median over the
# ranks (and their range) for shared memory and for TCP (HETCCL_SHM_DISABLE=1), each
# size (the i-th entry of --iters is N for the i-th size), with the trace off and on,
# and, with --base, for the same program built from a commit before the trace existed.
# Waiting ranks poll their links, and what the polls cost depends on how long they
# wait: the range says how much that moved the figures. So the table also gives the
# trace's own instructions per call, which do not depend on waits: a traced run that
# counts only inside the functions no untraced call runs (callgrind --toggle-collect:
# observe::record, which keeps the call, Tracer::write_out, which writes it,
# LinkWaits::stalled and ::moved, which time its waits), per call as above (median of
# the ranks), and what that is of the median per-call count with the trace off.
set -euo pipefail
cd "$(dirname "$0")/.."

base=""
sizes="1M 64M"
iters="8 2"
while [ $# -gt 0 ]; do
    case "$1" in
    --base) base="$2"; shift 2 ;;
    --sizes) sizes="$2"; shift 2 ;;
    --iters) iters="$2"; shift 2 ;;
    *) echo "trace-overhead.sh: unknown argument $1 (accepted: --base BIN, --sizes LIST, --iters LIST)" >&2; exit 2 ;;
    esac
done
command -v valgrind >/dev/null || {
    echo "trace-overhead.sh: valgrind is not installed (apt-get install -y --no-install-recommends valgrind)" >&2
    exit 2
}
[ -z "$base" ] || [ -x "$base" ] || { echo "trace-overhead.sh: --base $base is not an executable" >&2; exit 2; }

cargo build --release -q -p hetccl-tools --bin hetccl
cargo build --release -q -p hetccl --example trace_overhead
bin=target/release/examples/trace_overhead
launcher=target/release/hetccl
work=$(mktemp -d /tmp/hetccl-trace-overhead.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Instruction totals of the 4 ranks, one per line, in rank order:
# totals PROGRAM MODE(off|on|own) TRANSPORT SIZE ITERS
totals() {
    local prog="$1" mode="$2" transport="$3" size="$4" n="$5" d
    d="$work/$mode-$transport-$size-$n"
    mkdir -p "$d"
    local env=(HETCCL_TOPO_PROBE=0 HETCCL_TIMEOUT=900) only=()
    [ "$transport" = tcp ] && env+=(HETCCL_SHM_DISABLE=1)
    [ "$mode" != off ] && env+=("HETCCL_TRACE=$d/trace-%r.json")
    [ "$mode" = own ] && only=(--collect-atstart=no
        --toggle-collect='hetccl::observe::record'
        --toggle-collect='hetccl::observe::trace::Tracer::write_out'
        --toggle-collect='hetccl::observe::waits::LinkWaits::*')
    env "${env[@]}" "$launcher" run -n 4 -- \
        valgrind --tool=callgrind "${only[@]}" --callgrind-out-file="$d/cg.%q{RANK}" \
        "$prog" "$size" "$n" >"$d/log" 2>&1 || {
        echo "trace-overhead.sh: $mode $transport $size x$n failed:" >&2
        tail -20 "$d/log" >&2
        exit 1
    }
    for r in 0 1 2 3; do
        sed -n 's/^totals: //p' "$d/cg.$r"
    done
}

# Per-call cost of each rank: (total(2N) - total(N)) / N; prints "median min max".
per_call() {
    local prog="$1" mode="$2" transport="$3" size="$4" n="$5"
    paste <(totals "$prog" "$mode" "$transport" "$size" "$n") \
        <(totals "$prog" "$mode" "$transport" "$size" $((2 * n))) |
        awk -v n="$n" '{ printf "%.0f\n", ($2 - $1) / n }' | sort -n |
        awk '{ v[NR] = $1 } END { printf "%.0f %.0f %.0f\n", (v[2] + v[3]) / 2, v[1], v[4] }'
}

printf '# trace overhead, instructions per all-reduce (callgrind), 4 ranks, %s\n' "$(date -u +%F)"
printf '%-6s %6s %5s %14s %14s %14s %9s %9s %10s %9s\n' \
    transport size N base off on "off/base" "on/off" "trace own" "own/off"
set -- $iters
for size in $sizes; do
    n="${1:-2}"
    [ $# -gt 1 ] && shift
    for transport in shm tcp; do
        read -r off off_lo off_hi < <(per_call "$bin" off "$transport" "$size" "$n")
        read -r on on_lo on_hi < <(per_call "$bin" on "$transport" "$size" "$n")
        read -r own _ < <(per_call "$bin" own "$transport" "$size" "$n")
        b="-" b_lo="" b_hi="" ob="-"
        if [ -n "$base" ]; then
            read -r b b_lo b_hi < <(per_call "$base" off "$transport" "$size" "$n")
            ob=$(awk -v a="$off" -v b="$b" 'BEGIN { printf "%+.2f%%", (a / b - 1) * 100 }')
        fi
        oo=$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%+.2f%%", (a / b - 1) * 100 }')
        om=$(awk -v a="$own" -v b="$off" 'BEGIN { printf "%.2f%%", a / b * 100 }')
        printf '%-6s %6s %5s %14s %14s %14s %9s %9s %10s %9s\n' \
            "$transport" "$size" "$n" "$b" "$off" "$on" "$ob" "$oo" "$own" "$om"
        printf '%-6s %6s %5s %14s %14s %14s\n' "" "" "range" \
            "${b_lo:+$b_lo-$b_hi}" "$off_lo-$off_hi" "$on_lo-$on_hi"
    done
done
