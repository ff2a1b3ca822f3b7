#!/usr/bin/env bash
# busbw of every collective next to all-reduce's at the same sizes, for one link type:
#
#   scripts/compare-collectives.sh [--ranks N] [--tcp] [--repeats R] [--peer none|all|openmpi,mpich,intelmpi]
#                                  [-- hetccl-perf size flags]
#
# Runs hetccl-perf once per collective per repeat, cycling through the collectives so
# each repeat sees the same machine state, and prints per size the median busbw and its
# ratio to all-reduce's: one table out of place (broadcast, which has only the in-place
# form, shows that), one in place. With --peer (scripts/peers.sh; default none), each
# peer's MPI collective (scripts/mpi_allreduce_bench.c -g) runs right before hetccl's in
# every repeat (both sides' busbw from their median over iterations), and a
# table per collective gives every run of each side, the medians and
# hetccl's out-of-place median over the best peer's, with the load at each repeat. More
# ranks than CPUs are pinned to cores (`hetccl run --bind-cores`, the peers' launchers
# alike), as compare-mpi.sh does: unpinned, 4 ranks on 2 cores land differently from
# launch to launch.
# Default sizes in two bands, each call timed over about as long: -b 1M -e 4M -f 4 -n 100
# -w 5, then -b 16M -e 256M -f 4 -n 10 -w 2 (10 calls of 1 MiB take a few milliseconds,
# which a single scheduling hiccup on 2 cores skews). Flags after -- replace both bands.
# --tcp sets HETCCL_SHM_DISABLE=1.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=scripts/peers.sh
. "$here/peers.sh"
peers_arg=none
ranks=2
tcp=0
repeats=3
bands=("-b 1M -e 4M -f 4 -n 100 -w 5" "-b 16M -e 256M -f 4 -n 10 -w 2")
while [ $# -gt 0 ]; do
    case "$1" in
        --ranks) ranks=$2; shift ;;
        --tcp) tcp=1 ;;
        --repeats) repeats=$2; shift ;;
        --) shift; bands=("$*"); break ;;
        --peer) peers_arg=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "compare-collectives.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

peers=""
if [ "$peers_arg" != none ]; then
    peers=$(peer_list "$peers_arg") || exit 2
    for q in $peers; do peer_check "$q" || exit 1; done
fi
(cd "$root" && cargo build --release --quiet -p hetccl-tools --bin hetccl --bin hetccl-perf)
bin="$root/target/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for q in $peers; do peer_build "$q" "$here/mpi_allreduce_bench.c" "$work/bench.$q"; done
colls="all_reduce reduce_scatter all_gather broadcast reduce"
pin=()
pin_peer=0
if [ "$ranks" -gt "$(nproc)" ]; then pin=(--bind-cores); pin_peer=1; fi
link=shm
if [ "$tcp" = 1 ]; then link=tcp; fi

for rep in $(seq 1 "$repeats"); do
    echo "- repeat $rep: load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)" >>"$work/loads"
    for g in $colls; do
        for q in $peers; do
            peer_launch "$q" "$ranks" "$link" "$pin_peer"
            for band in "${bands[@]}"; do
                # shellcheck disable=SC2086 # a band is a list of flags
                "${peer_cmd[@]}" "$work/bench.$q" $band -g "$g" 2>>"$work/peer.err" ||
                    { cat "$work/peer.err" >&2; echo "$q $band -g $g failed" >&2; exit 1; }
            done |
                awk -v q="$q" '/^mpi_allreduce/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                       if (v["wrong"] != 0) { print q " wrong=" v["wrong"] > "/dev/stderr"; exit 1 }
                       print v["size"], v["busbw"] }' |
                while read -r size bw; do echo "$bw" >>"$work/peer.$q.$g.$size"; done
        done
        for band in "${bands[@]}"; do
            # shellcheck disable=SC2086 # a band is a list of flags
            HETCCL_SHM_DISABLE=$tcp "$bin/hetccl" run -n "$ranks" "${pin[@]}" -- "$bin/hetccl-perf" $band -g "$g" 2>&1 ||
                { echo "hetccl-perf $band -g $g failed" >&2; exit 1; }
        done |
            sed -n 's/^\[rank 0\] //p' |
            awk -v g="$g" '!/^#/ && NF >= 15 {
                for (k = 9; k <= 13; k += 4)
                    if ($k != 0 && $k != "N/A" && $k != "n/a") { print "wrong results: " g > "/dev/stderr"; exit 1 }
                # busbw at the median time (fields 14, 15): busbw x mean / median
                ip = $12 * $10 / $15
                oop = ($8 == "n/a") ? ip : $8 * $6 / $14; print $1, oop, ip }' |
            while read -r size oop ip; do
                echo "$oop" >>"$work/$g.$size"
                echo "$ip" >>"$work/ip.$g.$size"
            done
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); ranks: $ranks; link: $([ $tcp = 1 ] && echo tcp || echo shm); repeats: $repeats; pinned: $([ ${#pin[@]} -gt 0 ] && echo yes || echo no); load: $(cut -d' ' -f1-3 /proc/loadavg)"
# table PREFIX TITLE: medians of the files $work/PREFIX<collective>.<size>
table() {
    echo
    echo "$2"
    echo
    printf '| size (B) |'
    for g in $colls; do printf ' %s |' "$g"; done
    echo
    printf '| ---: |'
    for g in $colls; do printf ' ---: |'; done
    echo
    for size in $(cd "$work" && ls "$1"all_reduce.* | sed 's/.*\.//' | sort -n); do
        ar=$(median <"$work/$1all_reduce.$size")
        printf '| %s |' "$size"
        for g in $colls; do
            m=$( [ -f "$work/$1$g.$size" ] && median <"$work/$1$g.$size" || echo nan)
            if [ "$g" = all_reduce ]; then
                printf ' %.2f |' "$m"
            else
                awk -v m="$m" -v a="$ar" 'BEGIN { printf " %.2f (%.0f %%) |", m, 100 * m / a }'
            fi
        done
        echo
    done
}
table "" "out of place (broadcast: in place), busbw GB/s"
table ip. "in place, busbw GB/s"

[ -n "$peers" ] || exit 0
# Peer sizes are the nearest multiple of the rank count in elements (reduce-scatter,
# all-gather), so a peer's size is matched to hetccl's by rounding to 4 KiB or less.
echo
echo "Against the peers ($peers), busbw GB/s: hetccl out of place (broadcast: in place), each peer's median over repeats, every run in the order they alternated (each repeat: the peers, then hetccl):"
for g in $colls; do
    echo
    echo "$g"
    echo
    printf '| size (B) |'
    for q in $peers; do printf ' %s |' "$q"; done
    echo ' best peer | hetccl | hetccl/best | runs |'
    printf '| ---: |'
    for q in $peers; do printf ' ---: |'; done
    echo ' --- | ---: | ---: | --- |'
    for size in $(cd "$work" && ls "$g".* | sed 's/.*\.//' | sort -n); do
        h=$(median <"$work/$g.$size")
        printf '| %s |' "$size"
        best=""; bq=none; allruns=""
        for q in $peers; do
            f=$(cd "$work" && ls "peer.$q.$g".* 2>/dev/null |
                awk -F. -v s="$size" '{ d = $NF - s; if (d < 0) d = -d; if (d <= 4096) print }' | head -1)
            m=nan
            if [ -n "$f" ]; then
                m=$(median <"$work/$f")
                allruns+="$q: $(awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 }' "$work/$f"); "
            fi
            printf ' %.2f |' "$m"
            if awk -v m="$m" -v b="$best" 'BEGIN { exit !(m ~ /^[0-9.e+-]+$/ && (b == "" || m + 0 > b + 0)) }'; then best=$m; bq=$q; fi
        done
        allruns+="hetccl: $(awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 }' "$work/$g.$size")"
        awk -v bq="$bq" -v b="$best" -v h="$h" -v r="$allruns" \
            'BEGIN { printf " %s | %.2f | %s | %s |\n", bq, h, (b != "" && b + 0 > 0 ? sprintf("%.2f", h / b) : "n/a"), r }'
    done
done
echo
echo "Load average (1, 5, 15 min) as each repeat started:"
echo
cat "$work/loads"
