#!/usr/bin/env bash
# Side-by-side all-reduce bandwidth: MPI_Allreduce of one or more MPI libraries (the
# peers) against hetccl-perf, with single-thread memcpy and loopback TCP (iperf3 -P 4) as
# ceilings.
#
#   scripts/compare-mpi.sh [--peer all|openmpi,mpich,intelmpi] [--quick | --latency]
#                          [--bind | --no-bind] [--repeats N] [--stat mean|median]
#                          [--configs "shm2 tcp2 shm4 tcp4"] [--limit S] [--out FILE]
#
# Peers (scripts/peers.sh): openmpi (the system's), mpich and intelmpi (private prefixes
# from scripts/install-peers.sh, never on PATH); --peer all (the default) takes all three.
# Needs iperf3 and a Rust toolchain; it installs nothing. For every configuration it runs
# each peer and hetccl alternately --repeats times (default 5), each run covering every
# size, and prints per size every run of every side, each side's median over runs, and
# hetccl's median over the best peer's (the peer with the highest median busbw, or the
# lowest median time with --latency), with the load average at each run. Within a run
# both sides use their median over iterations of each iteration's slowest rank (what
# the peers' own benchmarks report; on a loaded 2-core machine one preempted iteration
# moves a mean, not the median); --stat mean takes both sides' slowest rank's mean time
# per iteration instead (nccl-tests' definition). hetccl is out-of-place unless a
# column says in-place.
# --limit S (default 300) stops a peer's launch that runs longer than S seconds, keeps
# the sizes it finished and lists it under the table: MPICH's ranks, two to a core,
# take a scheduler time slice per message (8 ms per all-reduce of 4 B on 4 ranks), and
# would take hours over the full sweep.
# --latency measures 4 B to 64 KiB with 2000 iterations and reports microseconds per
# call instead of busbw (the ratio column is then peer time / hetccl time, so above 1
# still means hetccl is faster).
#
# Configurations:
#   shm2  2 ranks, shared memory  (see scripts/peers.sh for each peer's settings)
#   tcp2  2 ranks, TCP loopback   (hetccl: HETCCL_SHM_DISABLE=1)
#   shm4  4 ranks on 2 cores (oversubscribed), shared memory
#   tcp4  4 ranks on 2 cores (oversubscribed), TCP loopback
# Pinning: configurations with more ranks than cores pin rank k to core k mod C on every
# side (the peers' launchers, hetccl run --bind-cores): left to the scheduler, 4 ranks on
# 2 cores land differently from launch to launch and small all-reduces take 2.0 or 3.5 µs
# depending on the launch. The others pin nothing: on a shared machine a pinned rank
# cannot move off a core that another job is using. --bind pins every configuration,
# --no-bind none.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=scripts/peers.sh
. "$here/peers.sh"
peers_arg=all
quick=0
latency=0
bind=oversubscribed
repeats=5
stat=median
configs="shm2 tcp2 shm4 tcp4"
limit=300
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --peer) peers_arg=$2; shift ;;
        --quick) quick=1 ;;
        --latency) latency=1 ;;
        --bind) bind=all ;;
        --no-bind) bind=none ;;
        --repeats) repeats=$2; shift ;;
        --stat) stat=$2; shift
                case "$stat" in mean|median) ;; *) echo "compare-mpi.sh: --stat takes mean or median, not $stat" >&2; exit 2 ;; esac ;;
        --configs) configs=$2; shift ;;
        --limit) limit=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "compare-mpi.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
# Size bands: each is one launch per tool; large sizes get fewer iterations so a
# repeat stays under a minute on a busy 2-core machine.
if [ "$latency" = 1 ]; then
    bands=("-b 4 -e 64K -f 4 -n 2000 -w 200")
elif [ "$quick" = 1 ]; then
    bands=("-b 256 -e 16M -f 16 -n 10 -w 3")
else
    bands=("-b 4 -e 16M -f 4 -n 20 -w 5" "-b 64M -e 256M -f 4 -n 5 -w 2")
fi

for tool in iperf3 cargo; do
    command -v "$tool" >/dev/null || { echo "compare-mpi.sh: $tool not found (CI installs iperf3)" >&2; exit 1; }
done
peers=$(peer_list "$peers_arg") || exit 2
for q in $peers; do peer_check "$q" || exit 1; done

work=$(mktemp -d)
iperf_pid=""
cleanup() {
    if [ -n "$iperf_pid" ]; then kill "$iperf_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "# building" >&2
for q in $peers; do peer_build "$q" "$here/mpi_allreduce_bench.c" "$work/bench.$q"; done
(cd "$root" && cargo build --release --quiet -p hetccl-tools --bin hetccl --bin hetccl-perf)
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
hetccl="$target/release/hetccl"
perf="$target/release/hetccl-perf"

# pinned N: whether configurations of N ranks pin them (see "Pinning" above).
pinned() {
    case "$bind" in
        all) return 0 ;;
        none) return 1 ;;
        *) [ "$1" -gt "$(nproc)" ] ;;
    esac
}

# run_mpi PEER CONFIG -> "size busbw" lines (or "size us" with --latency)
run_mpi() {
    local peer=$1 n=${2: -1} link=${2%?} pin=0
    if pinned "$n"; then pin=1; fi
    peer_launch "$peer" "$n" "$link" "$pin"
    : >"$work/mpi.out"
    for band in "${bands[@]}"; do
        # shellcheck disable=SC2086 # a band is a list of flags
        local rc=0
        ls /dev/shm >"$work/shm.before" 2>/dev/null || true
        timeout -k 5 "$limit" "${peer_cmd[@]}" "$work/bench.$peer" $band \
            >>"$work/mpi.out" 2>"$work/mpi.err" || rc=$?
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            # Ranks the launcher left behind go too, and the shared-memory segments
            # they made (this script runs nothing else meanwhile); the sizes finished
            # so far count.
            pkill -KILL -f "$work/bench.$peer" 2>/dev/null || true
            ls /dev/shm 2>/dev/null | grep -vxF -f "$work/shm.before" | grep -v '^hetccl' |
                while read -r f; do rm -f "/dev/shm/$f"; done || true
            echo "# $peer $2: stopped after $limit s in band $band" >&2
            echo "$peer $2 band [$band] stopped after $limit s" >>"$work/stopped"
            break
        elif [ "$rc" != 0 ]; then
            cat "$work/mpi.err" >&2
            return 1
        fi
    done
    local key=time_us
    if [ "$stat" = mean ]; then key=mean_us; fi
    awk -v lat="$latency" -v key="$key" -v peer="$peer" '/^mpi_allreduce/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                            if (v["wrong"] != 0) { print peer " wrong=" v["wrong"] > "/dev/stderr"; exit 1 }
                            if (lat == 1) print v["size"], v[key]
                            else print v["size"], v["size"] / (v[key] * 1e3) * 2 * (v["ranks"] - 1) / v["ranks"] }' "$work/mpi.out"
    sed -n 's/^max_rss_kib=//p' "$work/mpi.out" | sort -g | tail -1 >"$work/mpi.rss"
}

# run_hetccl CONFIG -> "size busbw_out_of_place busbw_in_place" lines
run_hetccl() {
    local n=${1: -1} link=${1%?} shm_off=0 pin=()
    if [ "$link" = tcp ]; then shm_off=1; fi
    if pinned "$n"; then pin=(--bind-cores); fi
    : >"$work/hetccl.out"
    for band in "${bands[@]}"; do
        # shellcheck disable=SC2086
        HETCCL_SHM_DISABLE=$shm_off "$hetccl" run -n "$n" "${pin[@]}" -- "$perf" $band -c 1 -d f32 -o sum \
            >>"$work/hetccl.out" 2>"$work/hetccl.err" || { cat "$work/hetccl.out" "$work/hetccl.err" >&2; return 1; }
    done
    # The launcher prefixes "[rank K] "; rows: size count type redop root, then out of
    # place and in place: mean time algbw busbw #wrong, then the median times out of
    # place and in place (fields 14 and 15).
    sed -n 's/^\[rank 0\] //p' "$work/hetccl.out" >"$work/hetccl.rank0"
    # busbw from a time column: the table rounds bandwidths to 0.01 GB/s.
    awk -v n="$n" -v lat="$latency" -v stat="$stat" '!/^#/ && NF >= 15 { if ($9 != 0) { print "hetccl wrong=" $9 > "/dev/stderr"; exit 1 }
                                       f = 2 * (n - 1) / n
                                       o = (stat == "median") ? $14 : $6; i = (stat == "median") ? $15 : $10
                                       if (lat == 1) print $1, o, i
                                       else print $1, $1 / (o * 1e3) * f, $1 / (i * 1e3) * f }' "$work/hetccl.rank0"
    sed -n 's/^# Peak RSS (max over ranks) : \([0-9.]*\) MiB/\1/p' "$work/hetccl.rank0" | sort -g | tail -1 >"$work/hetccl.rss"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "# ceilings: memcpy, iperf3" >&2
for band in "${bands[@]}"; do
    # shellcheck disable=SC2086
    "$work/bench.${peers%% *}" --memcpy $band -n 30
done |
    awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["size"], v["gbps"] }' >"$work/memcpy"
port=$((20000 + RANDOM % 20000))
iperf3 -s -B 127.0.0.1 -p "$port" -1 >/dev/null 2>&1 &
iperf_pid=$!
sleep 0.5
iperf_gbps=$(iperf3 -c 127.0.0.1 -p "$port" -P 4 -t 3 -f g 2>/dev/null |
    awk '/SUM/ && /receiver/ { for (i = 1; i <= NF; i++) if ($i == "Gbits/sec") print $(i - 1) / 8 }' | tail -1)
wait "$iperf_pid" 2>/dev/null || true
iperf_pid=""
iperf_gbps=${iperf_gbps:-nan}

for cfg in $configs; do
    for rep in $(seq 1 "$repeats"); do
        for q in $peers; do
            echo "# $cfg repeat $rep/$repeats: $q" >&2
            echo "$q $(cut -d' ' -f1 /proc/loadavg)" >>"$work/$cfg.load.$rep"
            run_mpi "$q" "$cfg" | while read -r size bw; do echo "$bw" >>"$work/$cfg.$q.$size"; done
            cat "$work/mpi.rss" >>"$work/$cfg.$q.rss"
        done
        echo "# $cfg repeat $rep/$repeats: hetccl" >&2
        echo "hetccl $(cut -d' ' -f1 /proc/loadavg)" >>"$work/$cfg.load.$rep"
        run_hetccl "$cfg" | while read -r size bw ip; do
            echo "$bw" >>"$work/$cfg.hetccl.$size"
            echo "$ip" >>"$work/$cfg.hetccl_ip.$size"
        done
        cat "$work/hetccl.rss" >>"$work/$cfg.hetccl.rss"
    done
done

# best_of LAT MEDIANS...: the index (from 1) and value of the best median, the highest
# busbw or (LAT=1) the lowest time; "nan" entries never win.
best_of() {
    local lat=$1; shift
    printf '%s\n' "$@" | awk -v lat="$lat" '$1 ~ /^[0-9.e+-]+$/ && (!seen || (lat == 1 ? $1 < b : $1 > b)) { b = $1; k = NR; seen = 1 }
                                            END { if (seen) print k, b; else print 0, "nan" }'
}
runs() { if [ -f "$1" ]; then awk '{ printf "%s%.3f", (NR > 1 ? " " : ""), $1 }' "$1"; else echo "-"; fi; }

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); cpu: $(lscpu | sed -n 's/^Model name: *//p') x $(nproc); peers: $peers; repeats: $repeats; time (both sides): $stat over iterations; mode: $([ $latency = 1 ] && echo latency || { [ $quick = 1 ] && echo quick || echo full; })"
    echo "iperf3 loopback -P 4: $iperf_gbps GB/s; pinned: $bind; load average at start/end: $load_start / $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    unit="busbw GB/s"; ratio="hetccl/best"
    if [ "$latency" = 1 ]; then unit="us"; ratio="best/hetccl time"; fi
    printf '| config | size (B) |'
    for q in $peers; do printf ' %s %s |' "$q" "$unit"; done
    printf ' best peer | hetccl %s | %s | hetccl in-place %s | memcpy GB/s |\n' "$unit" "$ratio" "$unit"
    printf '| --- | ---: |'
    for q in $peers; do printf ' ---: |'; done
    echo ' --- | ---: | ---: | ---: | ---: |'
    for cfg in $configs; do
        for size in $(cd "$work" && ls "$cfg.hetccl."[0-9]* 2>/dev/null | sed 's/.*\.//' | sort -n); do
            meds=()
            for q in $peers; do meds+=("$( [ -f "$work/$cfg.$q.$size" ] && median <"$work/$cfg.$q.$size" || echo nan)"); done
            read -r bi b <<<"$(best_of "$latency" "${meds[@]}")"
            bq=$( [ "$bi" -gt 0 ] && echo "$peers" | awk -v k="$bi" '{ print $k }' || echo none)
            h=$(median <"$work/$cfg.hetccl.$size")
            hi=$( [ -f "$work/$cfg.hetccl_ip.$size" ] && median <"$work/$cfg.hetccl_ip.$size" || echo nan)
            c=$(awk -v s="$size" '$1 == s { print $2 }' "$work/memcpy")
            printf '| %s | %d |' "$cfg" "$size"
            for m in "${meds[@]}"; do printf ' %.3f |' "$m"; done
            awk -v bq="$bq" -v b="$b" -v h="$h" -v hi="$hi" -v c="${c:-nan}" -v lat="$latency" \
                'BEGIN { if (lat == 1) r = (h > 0 && b == b + 0) ? sprintf("%.2f", b / h) : "n/a"
                         else r = (b > 0 && h == h + 0) ? sprintf("%.2f", h / b) : "n/a"
                         printf " %s | %.3f | %s | %.3f | %.2f |\n", bq, h, r, hi, c }'
        done
    done
    if [ -s "$work/stopped" ]; then
        echo
        echo "Peer launches stopped at the time limit (--limit; the sizes they finished count):"
        echo
        sed 's/^/- /' "$work/stopped"
    fi
    echo
    echo "Every run, in the order they alternated (each repeat: the peers, then hetccl; hetccl out of place):"
    echo
    echo "| config | size (B) | side | runs |"
    echo "| --- | ---: | --- | --- |"
    for cfg in $configs; do
        for size in $(cd "$work" && ls "$cfg.hetccl."[0-9]* 2>/dev/null | sed 's/.*\.//' | sort -n); do
            for q in $peers hetccl; do printf '| %s | %d | %s | %s |\n' "$cfg" "$size" "$q" "$(runs "$work/$cfg.$q.$size")"; done
        done
    done
    echo
    echo "Load average (1 min) as each run started:"
    echo
    for cfg in $configs; do
        for rep in $(seq 1 "$repeats"); do
            printf -- '- %s repeat %d: %s\n' "$cfg" "$rep" "$(tr '\n' ';' <"$work/$cfg.load.$rep" | sed 's/;$//; s/;/, /g')"
        done
    done
    echo
    printf '| config |'
    for q in $peers hetccl; do printf ' %s peak RSS per rank (MiB, median) |' "$q"; done
    echo
    printf '| --- |'
    for q in $peers hetccl; do printf ' ---: |'; done
    echo
    for cfg in $configs; do
        printf '| %s |' "$cfg"
        for q in $peers; do printf ' %.1f |' "$(awk '{ print $1 / 1024 }' "$work/$cfg.$q.rss" | median)"; done
        printf ' %.1f |\n' "$(median <"$work/$cfg.hetccl.rss")"
    done
} | if [ -n "$out" ]; then tee "$out"; else cat; fi
