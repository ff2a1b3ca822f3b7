#!/usr/bin/env bash
# Whether a slow minute of the shared-memory path is hetccl's or the machine's: rounds in
# which, back to back, the bare slot exchange (examples/memory_floor.rs), hetccl and one
# or more MPI peers (scripts/peers.sh) run 2 ranks over shared memory, each launch under
# `perf stat` with software counters (context switches, CPU migrations, page faults, task
# clock: the virtual machine has no hardware counters), with the CPU every thread of
# hetccl's ranks sat on sampled every 50 ms (/proc/<pid>/task/*/stat, field 39).
#
#   scripts/compare-shm-modes.sh [--rounds N] [--gap S] [--peer intelmpi] [--max-load L]
#                                [--sizes "1 16 64"] [--variant "NAME VAR=VALUE..."]... [--out FILE]
#
# One line per round (and per launch in FILE.raw): the time, the load average, the slot
# exchange's and memcpy floor's busbw per size, then per side its busbw per size from
# its median over iterations (hetccl: out of place / in place; the peers: from their
# median / from their mean over iterations), its
# context switches, migrations and page faults, and for hetccl the CPUs its ranks' threads
# were seen on (rank:thread=cpu,cpu...), and last the host's steal time over the round
# in jiffies (/proc/stat). Each launch also shows pp=B/A, the round trip (ns) of a cache
# line between the first two CPUs just before and just after it
# (examples/core_pingpong.rs): where the host runs the two virtual CPUs on one die or on
# two, which changes within seconds and decides how fast shared memory is. --max-load L waits (polling every 10 s) until
# the 1-minute load average is at most L before each round, so a series can be taken in
# the quiet windows of a shared machine. Each --variant adds a hetccl launch per round
# with those settings (for example --variant "chunk128k HETCCL_CHUNK_BYTES=131072";
# words that start with -- go to `hetccl run`, as in --variant "pinned --bind-cores", and
# words perf:FLAG to hetccl-perf, as in --variant "shared perf:--shared"),
# right after the default one, so the settings can be compared in each mode. Defaults: 10 rounds, 6 s apart, --peer intelmpi,
# sizes 1, 16 and 64 MiB.
set -Eeuo pipefail
trap 'echo "compare-shm-modes.sh: stopped by a failed command at line $LINENO" >&2' ERR

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=scripts/peers.sh
. "$here/peers.sh"
rounds=10
gap=6
peers_arg=intelmpi
max_load=""
sizes="1 16 64"
out=""
variants=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift ;;
        --gap) gap=$2; shift ;;
        --peer) peers_arg=$2; shift ;;
        --max-load) max_load=$2; shift ;;
        --sizes) sizes=$2; shift ;;
        --variant) variants+=("$2"); shift ;;
        --out) out=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "compare-shm-modes.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
peers=$(peer_list "$peers_arg") || exit 2
for q in $peers; do peer_check "$q" || exit 1; done
command -v perf >/dev/null || { echo "compare-shm-modes.sh: perf not found (apt-get install linux-perf)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
# The example builds the library with its test kit (a dev-dependency), the tools without:
# in one target directory each build would undo the other's, so the example has its own.
(cd "$root" && cargo build --release --quiet -p hetccl-tools --bin hetccl --bin hetccl-perf &&
    CARGO_TARGET_DIR="$target/floor" cargo build --release --quiet --example memory_floor --example core_pingpong)
pingpong() { "$target/floor/release/examples/core_pingpong"; }
for q in $peers; do peer_build "$q" "$here/mpi_allreduce_bench.c" "$work/bench.$q"; done
lo=$(echo "$sizes" | tr ' ' '\n' | sort -n | head -1)
hi=$(echo "$sizes" | tr ' ' '\n' | sort -n | tail -1)
band=(-b "${lo}M" -e "${hi}M" -f 4 -n 10 -w 2)
counters=context-switches,cpu-migrations,page-faults,task-clock

# stealing: the host's steal time so far, jiffies summed over CPUs (/proc/stat): time a
# virtual CPU was ready to run but the host ran something else.
stealing() { awk '/^cpu / { print $9 }' /proc/stat; }

# counts FILE: "cs mig pf" from perf stat -x, output.
counts() { awk -F, '$3 == "context-switches" { c = $1 } $3 == "cpu-migrations" { m = $1 } $3 == "page-faults" { p = $1 }
                    END { printf "cs=%s mig=%s pf=%s", c, m, p }' "$1"; }

# placement LAUNCHER_PID: until it exits, every 50 ms, "rank tid comm cpu" of each thread
# of the launcher's children (the ranks, in start order).
placement() {
    local launcher=$1 kids k t
    while kill -0 "$launcher" 2>/dev/null; do
        # A process that exits between the glob and awk's read makes awk exit 2 (a file
        # it could not open); under pipefail that would end the script, silently.
        kids=$({ awk -v p="$launcher" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null || true; } | sort -n)
        k=0
        for pid in $kids; do
            for t in /proc/"$pid"/task/*; do
                [ -r "$t/stat" ] || continue
                # comm may hold spaces; field 39 counts from after its closing parenthesis.
                # A thread may end between the test above and the reads: skip it quietly.
                echo "$k $(cat "$t/comm" 2>/dev/null || true) $({ sed 's/.*) //' "$t/stat" 2>/dev/null || true; } | awk '{ print $37 }')"
            done
            k=$((k + 1))
        done
        sleep 0.05
    done
}

for round in $(seq 1 "$rounds"); do
    if [ -n "$max_load" ]; then
        while awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v m="$max_load" 'BEGIN { exit !(l > m) }'; do sleep 10; done
    fi
    stamp=$(date -u +%H:%M:%S)
    load=$(cut -d' ' -f1 /proc/loadavg)
    steal0=$(stealing)
    # The floor: memcpy pattern and the slot exchange, busbw per size.
    # shellcheck disable=SC2086 # sizes is a list
    "$target/floor/release/examples/memory_floor" $sizes >"$work/floor" 2>&1
    floor=$(awk -F'|' '$2 ~ /[0-9]/ { gsub(/ /, "", $2); split($6, s, " "); split($3, a, " ");
                        printf "%s%dM:%s/%s", (n++ ? " " : ""), $2 / 1048576, s[1], a[1] }' "$work/floor")
    line="$stamp load=$load slots/floor[$floor]"
    # hetccl, with its threads' CPUs sampled; then each variant.
    for v in "default" "${variants[@]}"; do
        read -r vname vwords <<<"$v"
        venv=(); vflags=(); pflags=()
        for w in $vwords; do
            case "$w" in perf:*) pflags+=("${w#perf:}") ;; --*) vflags+=("$w") ;; *) venv+=("$w") ;; esac
        done
        pp0=$(pingpong)
        perf stat -x, -e "$counters" -o "$work/h.perf" -- env "${venv[@]}" "$target/release/hetccl" run -n 2 "${vflags[@]}" -- \
            "$target/release/hetccl-perf" "${band[@]}" "${pflags[@]}" >"$work/h.out" 2>&1 &
        hpid=$!
        sleep 0.2
        launcher=$({ awk -v p="$hpid" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null || true; } | head -1)
        if [ -n "$launcher" ]; then placement "$launcher" >"$work/h.cpus"; else : >"$work/h.cpus"; fi
        wait "$hpid" || { cat "$work/h.out" >&2; exit 1; }
        pp1=$(pingpong)
        het=$(sed -n 's/^\[rank 0\] //p' "$work/h.out" |
            awk '!/^#/ && NF >= 15 { if ($9 != 0 || $13 != 0) { print "hetccl wrong" > "/dev/stderr"; exit 1 }
                                      printf "%s%dM:%.2f/%.2f", (n++ ? " " : ""), $1 / 1048576, $1 / ($14 * 1e3), $1 / ($15 * 1e3) }')
        name=hetccl
        [ "$vname" = default ] || name="hetccl-$vname"
        line+=" $name[$het $(counts "$work/h.perf") pp=$pp0/$pp1]"
        if [ "$vname" = default ]; then
            cpus=$(sort -u "$work/h.cpus" | awk '{ k = $1 ":" $2; c[k] = c[k] (c[k] == "" ? "" : ",") $3 }
                                                 END { for (k in c) printf "%s=%s ", k, c[k] }' | tr ' ' '\n' | sort | tr '\n' ' ')
            line+=" cpus[${cpus% }]"
        fi
        if [ -n "$out" ]; then { echo "## round $round $stamp $name"; cat "$work/h.out" "$work/h.perf"; } >>"$out.raw"; fi
    done
    for q in $peers; do
        peer_launch "$q" 2 shm 0
        pp0=$(pingpong)
        perf stat -x, -e "$counters" -o "$work/p.perf" -- "${peer_cmd[@]}" "$work/bench.$q" "${band[@]}" \
            >"$work/p.out" 2>&1 || { cat "$work/p.out" >&2; exit 1; }
        pp1=$(pingpong)
        pb=$(awk '/^mpi_allreduce/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                   if (v["wrong"] != 0) { print "peer wrong" > "/dev/stderr"; exit 1 }
                   printf "%s%dM:%.2f/%.2f", (n++ ? " " : ""), v["size"] / 1048576, v["size"] / (v["time_us"] * 1e3), v["size"] / (v["mean_us"] * 1e3) }' "$work/p.out")
        line+=" $q[$pb $(counts "$work/p.perf") pp=$pp0/$pp1]"
    done
    line+=" steal=$(( $(stealing) - steal0 ))j"
    echo "$line"
    if [ -n "$out" ]; then
        echo "$line" >>"$out"
        { echo "## round $round $stamp load $load floor and peers"; cat "$work/floor" "$work/p.out" "$work/p.perf"; } >>"$out.raw"
    fi
    [ "$round" = "$rounds" ] || sleep "$gap"
done
