#!/usr/bin/env bash
# What HETCCL_TRACE costs per collective, in instructions (callgrind), so that the load
# of the machine does not enter the figure.
#
#   scripts/trace-overhead.sh [--sizes "1M 64M"] [--iters "32 2"]
#
# Four ranks (`hetccl run -n 4`) run examples/trace_overhead: nothing but N f32 sum
# all-reduces, over shared memory and over TCP (HETCCL_SHM_DISABLE=1), each size (the
# i-th entry of --iters is N for the i-th size). Each count is taken twice, with N and
# with 2N calls; the difference over N is the count per call, with the setup (init,
# clock alignment, exit) cancelled out.
#
# The method. A rank that waits polls its links, and what the polls cost depends on how
# long it waits: counted whole, the untraced per-call count of one rank at 1 MiB over
# TCP moved by a factor of three between ranks and runs, more than the trace's cost. So
# the collective's own work is counted, not its waiting:
#
#   work     callgrind --collect-atstart=no with --toggle-collect on
#              Progress::execute_guarded   the collective (collection on inside),
#              *::poll_recv, *::poll_send  the links' polls (off inside: a poll runs
#                                          whether or not anything has come),
#              <.. as RecvSink>::*         what a poll hands over (on again inside: the
#                                          copy and the reduction of received data),
#              Tracer::write_out           the trace's writing, which runs at exit.
#            Toggles nest: each flips collection on entry and back on return.
#   own      the trace's own instructions: only inside observe::record (keeps the
#            call), Tracer::write_out (formats and writes it) and LinkWaits::* (times
#            its waits).
#
# With the events of a run under the trace's buffer (4096 events: keep N at or under
# 512 at four events a call), write_out runs only at exit, outside the collective. What
# "work" still holds of waiting: the executor's own loop and its wait ladder (spin,
# yield, sleep), inlined into it, a few hundred instructions per idle pass; the range
# over the ranks says how much that is.
#
# Printed per rank: untraced work, traced work, the trace's own count, traced/untraced
# - 1 and own/untraced; then the medians over the ranks.
set -euo pipefail
cd "$(dirname "$0")/.."

sizes="1M 64M"
iters="32 2"
while [ $# -gt 0 ]; do
    case "$1" in
    --sizes) sizes="$2"; shift 2 ;;
    --iters) iters="$2"; shift 2 ;;
    *) echo "trace-overhead.sh: unknown argument $1 (accepted: --sizes LIST, --iters LIST)" >&2; exit 2 ;;
    esac
done
command -v valgrind >/dev/null || {
    echo "trace-overhead.sh: valgrind is not installed (apt-get install -y --no-install-recommends valgrind)" >&2
    exit 2
}

cargo build --release -q -p hetccl-tools --bin hetccl
cargo build --release -q -p hetccl --example trace_overhead
bin=target/release/examples/trace_overhead
launcher=target/release/hetccl
work=$(mktemp -d /tmp/hetccl-trace-overhead.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Instruction totals of the 4 ranks, one per line, in rank order:
# totals MODE(off|on|own) TRANSPORT SIZE ITERS
totals() {
    local mode="$1" transport="$2" size="$3" n="$4" d
    d="$work/$mode-$transport-$size-$n"
    mkdir -p "$d"
    local env=(HETCCL_TOPO_PROBE=0 HETCCL_TIMEOUT=900) only=()
    [ "$transport" = tcp ] && env+=(HETCCL_SHM_DISABLE=1)
    [ "$mode" != off ] && env+=("HETCCL_TRACE=$d/trace-%r.json")
    if [ "$mode" = own ]; then
        only=(--collect-atstart=no
            --toggle-collect='hetccl::observe::record'
            --toggle-collect='hetccl::observe::trace::Tracer::write_out'
            --toggle-collect='hetccl::observe::waits::LinkWaits::*')
    else
        only=(--collect-atstart=no
            --toggle-collect='hetccl::communicator::Progress::execute_guarded'
            --toggle-collect='*::poll_recv'
            --toggle-collect='*::poll_send'
            --toggle-collect='*as hetccl::transport::RecvSink>::*'
            --toggle-collect='hetccl::observe::trace::Tracer::write_out')
    fi
    env "${env[@]}" "$launcher" run -n 4 -- \
        valgrind --tool=callgrind "${only[@]}" --callgrind-out-file="$d/cg.%q{RANK}" \
        "$bin" "$size" "$n" >"$d/log" 2>&1 || {
        echo "trace-overhead.sh: $mode $transport $size x$n failed:" >&2
        tail -20 "$d/log" >&2
        exit 1
    }
    for r in 0 1 2 3; do
        sed -n 's/^totals: //p' "$d/cg.$r"
    done
}

# Per-call count of each rank, in rank order: (total(2N) - total(N)) / N.
per_call() {
    local mode="$1" transport="$2" size="$3" n="$4"
    paste <(totals "$mode" "$transport" "$size" "$n") \
        <(totals "$mode" "$transport" "$size" $((2 * n))) |
        awk -v n="$n" '{ printf "%.0f\n", ($2 - $1) / n }'
}

printf '# trace overhead, instructions per all-reduce (callgrind, waiting left out), 4 ranks, %s, load %s\n' \
    "$(date -u '+%F %H:%M')" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-6s %6s %4s %5s %12s %12s %10s %9s %9s\n' \
    transport size N rank untraced traced "trace own" "traced/un" "own/un"
set -- $iters
for size in $sizes; do
    n="${1:-2}"
    [ $# -gt 1 ] && shift
    for transport in shm tcp; do
        paste <(per_call off "$transport" "$size" "$n") \
            <(per_call on "$transport" "$size" "$n") \
            <(per_call own "$transport" "$size" "$n") |
            awk -v t="$transport" -v s="$size" -v n="$n" '
                function pct(a, b) { return sprintf("%+.2f%%", (a / b - 1) * 100) }
                function med(v,   k, i, j, x) {
                    for (i = 1; i <= 4; i++) x[i] = v[i]
                    for (i = 1; i <= 4; i++) for (j = i + 1; j <= 4; j++)
                        if (x[j] < x[i]) { k = x[i]; x[i] = x[j]; x[j] = k }
                    return (x[2] + x[3]) / 2
                }
                {
                    r = NR; off[r] = $1; on[r] = $2; own[r] = $3
                    printf "%-6s %6s %4s %5s %12d %12d %10d %9s %8.2f%%\n", t, s, n, r - 1,
                        $1, $2, $3, pct($2, $1), $3 / $1 * 100
                }
                END {
                    mo = med(off); mn = med(on); mw = med(own)
                    printf "%-6s %6s %4s %5s %12d %12d %10d %9s %8.2f%%\n", t, s, n, "med",
                        mo, mn, mw, pct(mn, mo), mw / mo * 100
                }'
    done
done
