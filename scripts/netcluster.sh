#!/usr/bin/env bash
# A simulated cluster on one machine: each "node" is a network namespace, all joined by
# one bridge (in a namespace of its own) through veth pairs whose both directions are
# rate-limited with tbf. Ranks of one node share /dev/shm and talk shared memory; nodes
# talk TCP over the limited links. Nothing outside the namespaces it creates is touched.
#
#   netcluster.sh up K [--rate 1gbit] [--mtu 1500]   create K nodes (no --rate: unlimited)
#                 [--rates 1gbit,1gbit,250mbit]       or a rate per node (a slower NIC)
#   netcluster.sh run --ranks 3,2,1 [--rate R | --rates R0,R1,..] [--port P] [--quiet] -- PROGRAM ARGS...
#                                                     start the ranks of node k in namespace k
#                                                     (creates the nodes if they are not up,
#                                                     and removes them again afterwards)
#   netcluster.sh mpirun --ranks 2,2 [MPIRUN OPTIONS] -- PROGRAM ARGS...
#                                                     the same placement under Open MPI's
#                                                     mpirun (nodes must be up)
#   netcluster.sh down                                remove every namespace it made
#   netcluster.sh status                              list nodes, addresses and qdiscs
#
# Ranks get torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
# MASTER_ADDR = node 0's address, MASTER_PORT) plus HETCCL_JOB_ID/KEY,
# HETCCL_SOCKET_IFNAME (the node's veth) and HETCCL_NODE_ID=node<k>. Output lines are
# prefixed with "[rank r]". `run` exits with the first failing rank's status and kills
# the others; 0 when all succeed.
#
# Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2 and tc. Where namespaces cannot
# be created it prints "netcluster: SKIP: ..." and exits 77.
#
# NETCLUSTER_PREFIX (default hccl) names the namespaces <prefix>-br, <prefix>-n0, ... so
# several clusters can coexist; addresses are 10.231.0.<k+1>/24 inside each cluster.
set -uo pipefail

PREFIX=${NETCLUSTER_PREFIX:-hccl}
SUBNET=10.231.0
BR_NS="$PREFIX-br"
SKIP=77

die() { echo "netcluster: $*" >&2; exit 1; }
skip() { echo "netcluster: SKIP: $*" >&2; exit $SKIP; }

node_ns() { echo "$PREFIX-n$1"; }
node_if() { echo "hccl$1"; }     # inside node namespace k
port_if() { echo "port$1"; }     # inside the bridge namespace
node_addr() { echo "$SUBNET.$(($1 + 1))"; }

nodes_up() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-n[0-9]+$" | wc -l
}

need_tools() {
    command -v ip >/dev/null || skip "iproute2 (ip) is not installed"
    command -v tc >/dev/null || skip "tc is not installed"
}

# Probe with a throw-away namespace, so the real ones are only made when this works.
check_permitted() {
    need_tools
    local probe="$PREFIX-probe$$"
    if ! ip netns add "$probe" 2>/dev/null; then
        skip "cannot create network namespaces here (needs root / CAP_SYS_ADMIN)"
    fi
    ip netns del "$probe" 2>/dev/null
}

# tbf on the egress of `dev` in namespace `ns`: about 1 ms of traffic as burst (at
# least 32 KiB, so a 64 KiB GSO packet is split rather than dropped), 50 ms of queue.
limit() {
    local ns=$1 dev=$2 rate=$3
    local bps burst
    bps=$(rate_bytes "$rate") || die "cannot read rate '$rate' (use e.g. 100mbit, 1gbit)"
    burst=$((bps / 1000))
    ((burst < 32768)) && burst=32768
    ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms ||
        die "tc could not add a tbf qdisc on $dev in $ns"
}

# Bytes per second of a tc rate (kbit, mbit, gbit, bit, or bps-style suffixes).
rate_bytes() {
    local r=${1,,}
    local n=${r%%[a-z]*} unit=${r##*[0-9.]}
    [[ -n $n ]] || return 1
    case $unit in
    bit | "") awk -v n="$n" 'BEGIN{printf "%d", n/8}' ;;
    kbit) awk -v n="$n" 'BEGIN{printf "%d", n*1000/8}' ;;
    mbit) awk -v n="$n" 'BEGIN{printf "%d", n*1000000/8}' ;;
    gbit) awk -v n="$n" 'BEGIN{printf "%d", n*1000000000/8}' ;;
    kbps) awk -v n="$n" 'BEGIN{printf "%d", n*1000}' ;;
    mbps) awk -v n="$n" 'BEGIN{printf "%d", n*1000000}' ;;
    gbps) awk -v n="$n" 'BEGIN{printf "%d", n*1000000000}' ;;
    *) return 1 ;;
    esac
}

cmd_down() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(n[0-9]+|br)$"); do
        ip netns del "$ns" 2>/dev/null || echo "netcluster: could not remove $ns" >&2
    done
    rm -rf /tmp/netcluster-"$PREFIX"-n[0-9]*
    return 0
}

cmd_up() {
    local k=${1:-}
    shift || true
    [[ $k =~ ^[0-9]+$ ]] && ((k >= 1 && k <= 64)) || die "up needs a node count from 1 to 64"
    local rate="" rates="" mtu=1500
    while (($#)); do
        case $1 in
        --rate) rate=${2:?--rate needs a value}; shift 2 ;;
        --rates) rates=${2:?--rates needs a value}; shift 2 ;;
        --mtu) mtu=${2:?--mtu needs a value}; shift 2 ;;
        *) die "unknown option $1 for up" ;;
        esac
    done
    local -a per_rate=()
    if [[ -n $rates ]]; then
        [[ -z $rate ]] || die "give --rate or --rates, not both"
        IFS=, read -r -a per_rate <<<"$rates"
        ((${#per_rate[@]} == k)) || die "--rates $rates names ${#per_rate[@]} rates for $k nodes"
    fi
    check_permitted
    (($(nodes_up) == 0)) || die "a cluster with prefix $PREFIX is up already; run 'down' first"
    # A half-built cluster is removed again whatever fails below.
    trap 'cmd_down' EXIT
    trap 'exit 130' INT TERM
    set -e
    ip netns add "$BR_NS"
    ip netns exec "$BR_NS" ip link set lo up
    ip netns exec "$BR_NS" ip link add br0 type bridge
    ip netns exec "$BR_NS" ip link set br0 up
    local i ns dev port
    for ((i = 0; i < k; i++)); do
        ns=$(node_ns $i) dev=$(node_if $i) port=$(port_if $i)
        ip netns add "$ns"
        ip netns exec "$ns" ip link set lo up
        # Both ends are created inside their namespaces: no interface ever appears in
        # (or is taken from) the namespace this script runs in.
        ip link add "$dev" netns "$ns" mtu "$mtu" type veth peer name "$port" netns "$BR_NS" mtu "$mtu"
        ip netns exec "$BR_NS" ip link set "$port" master br0
        ip netns exec "$BR_NS" ip link set "$port" up
        ip netns exec "$ns" ip addr add "$(node_addr $i)/24" dev "$dev"
        ip netns exec "$ns" ip link set "$dev" up
        local r=${per_rate[i]:-$rate}
        if [[ -n $r ]]; then
            limit "$ns" "$dev" "$r"             # what the node sends
            limit "$BR_NS" "$port" "$r"         # what the node receives
        fi
    done
    set +e
    trap - EXIT INT TERM
    echo "netcluster: $k nodes up (prefix $PREFIX, ${rates:-${rate:-unlimited}} per direction per node)"
}

cmd_status() {
    local i ns
    for ((i = 0; ; i++)); do
        ns=$(node_ns $i)
        ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns" || break
        echo "node $i: namespace $ns, $(node_if $i) $(node_addr $i)"
        ip netns exec "$ns" tc qdisc show dev "$(node_if $i)" | sed 's/^/  egress:  /'
        ip netns exec "$BR_NS" tc qdisc show dev "$(port_if $i)" | sed 's/^/  ingress: /'
    done
    ((i > 0)) || echo "no cluster with prefix $PREFIX"
}

PIDS=()
CREATED=0

# Ends every rank still running (each leads its own process group) and, if this run
# made the cluster, removes it.
cleanup_run() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM -- "-$p" 2>/dev/null
    done
    sleep 0.2
    for p in "${PIDS[@]}"; do
        kill -KILL -- "-$p" 2>/dev/null
    done
    ((CREATED)) && cmd_down
    return 0
}

cmd_run() {
    local ranks="" rate="" rates="" port="" quiet=0
    while (($#)); do
        case $1 in
        --ranks) ranks=${2:?--ranks needs a value}; shift 2 ;;
        --rate) rate=${2:?--rate needs a value}; shift 2 ;;
        --rates) rates=${2:?--rates needs a value}; shift 2 ;;
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --quiet) quiet=1; shift ;;
        --) shift; break ;;
        *) die "unknown option $1 for run (did you forget -- before the program?)" ;;
        esac
    done
    (($#)) || die "run needs -- PROGRAM [ARGS...]"
    [[ $ranks =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--ranks needs a list like 2,2 or 3,2,1"
    local -a per_node
    IFS=, read -r -a per_node <<<"$ranks"
    local k=${#per_node[@]} world=0 n
    for n in "${per_node[@]}"; do
        ((n >= 1)) || die "every node needs at least one rank (--ranks $ranks)"
        world=$((world + n))
    done

    trap 'cleanup_run' EXIT
    trap 'exit 130' INT TERM
    local up
    up=$(nodes_up)
    if ((up == 0)); then
        local -a opts=()
        [[ -n $rate ]] && opts=(--rate "$rate")
        [[ -n $rates ]] && opts+=(--rates "$rates")
        (cmd_up "$k" "${opts[@]}") >/dev/null || exit $?
        CREATED=1
    elif ((up < k)); then
        die "$up nodes are up but --ranks names $k; run 'down' first"
    elif [[ -n $rate$rates ]]; then
        die "--rate and --rates apply when run creates the nodes; they are up already"
    fi

    [[ -n $port ]] || port=$((20000 + RANDOM % 40000))
    local job="netcluster-$$-$RANDOM"
    local key
    key=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    local rank=0 i l
    local -A rank_of=()
    for ((i = 0; i < k; i++)); do
        for ((l = 0; l < per_node[i]; l++)); do
            # setsid: each rank leads its own process group, so killing it takes its
            # children too; setsid and `ip netns exec` exec in place, so $! is the rank.
            setsid -w ip netns exec "$(node_ns $i)" env \
                RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$l LOCAL_WORLD_SIZE=${per_node[i]} \
                MASTER_ADDR="$(node_addr 0)" MASTER_PORT="$port" \
                HETCCL_JOB_ID="$job" HETCCL_JOB_KEY="$key" \
                HETCCL_SOCKET_IFNAME="$(node_if $i)" HETCCL_NODE_ID="node$i" \
                "$@" > >(
                    if ((quiet)); then cat >/dev/null; else sed -u "s/^/[rank $rank] /"; fi
                ) 2>&1 &
            PIDS+=($!)
            rank_of[$!]=$rank
            rank=$((rank + 1))
        done
    done

    local -a running=("${PIDS[@]}")
    local status=0 pid rc p
    while ((${#running[@]})); do
        pid=""
        wait -n -p pid "${running[@]}"
        rc=$?
        [[ -n $pid ]] || break
        local -a rest=()
        for p in "${running[@]}"; do [[ $p == "$pid" ]] || rest+=("$p"); done
        running=("${rest[@]}")
        if ((rc != 0)); then
            echo "netcluster: rank ${rank_of[$pid]} exited with status $rc; stopping the others" >&2
            status=$rc
            break
        fi
    done
    cleanup_run
    PIDS=()
    # Let the output filters drain before the caller reads our exit.
    wait 2>/dev/null
    trap - EXIT INT TERM
    return $status
}

# Open MPI: mpirun runs in node 0's namespace and starts its daemons on the other
# nodes through this script as its rsh agent ("agent HOST COMMAND"), which runs the
# command in HOST's namespace. Open MPI's shared-memory transport is left out: every
# namespace has the same hostname and shares /dev/shm, so its segment names collide
# across nodes (seen as a crash in mca_btl_vader); ranks of one node use TCP on the
# node's own address instead, which is not rate-limited. For the same reason each
# node's daemon gets its own session directory, and the hwloc run-time component,
# whose shared topology segment crashed daemons now and then, is left out (no binding).
cmd_mpirun() {
    local ranks=""
    local -a opts=()
    while (($#)); do
        case $1 in
        --ranks) ranks=${2:?--ranks needs a value}; shift 2 ;;
        --) shift; break ;;
        *) opts+=("$1"); shift ;;
        esac
    done
    (($#)) || die "mpirun needs -- PROGRAM [ARGS...]"
    [[ $ranks =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--ranks needs a list like 2,2 or 3,2,1"
    command -v mpirun >/dev/null || skip "mpirun is not installed"
    local -a per_node
    IFS=, read -r -a per_node <<<"$ranks"
    local k=${#per_node[@]} world=0 hosts="" i
    (($(nodes_up) >= k)) || die "bring $k nodes up first (netcluster.sh up $k ...)"
    for ((i = 0; i < k; i++)); do
        world=$((world + per_node[i]))
        hosts+="${hosts:+,}$(node_addr $i):${per_node[i]}"
    done
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NETCLUSTER_PREFIX=$PREFIX \
        ip netns exec "$(node_ns 0)" mpirun -np "$world" --host "$hosts" \
        --mca plm_rsh_agent "$(readlink -f "$0") agent" \
        --mca btl self,tcp --mca btl_tcp_if_include "$SUBNET.0/24" --mca rtc ^hwloc \
        --mca oob_tcp_if_include "$SUBNET.0/24" -x NETCLUSTER_PREFIX \
        "${opts[@]}" "$@"
}

cmd_agent() {
    # Open MPI calls "agent [rsh options] HOST COMMAND...", like ssh.
    while [[ ${1:-} == -* ]]; do shift; done
    local host=${1:?agent needs a host}
    shift
    local k=$((${host##*.} - 1))
    # Session files of their own per node: the daemons share one hostname and /tmp.
    export OMPI_MCA_orte_tmpdir_base="/tmp/netcluster-$PREFIX-n$k"
    mkdir -p "$OMPI_MCA_orte_tmpdir_base"
    exec ip netns exec "$(node_ns $k)" /bin/sh -c "$*"
}

cmd=${1:-}
shift || true
case $cmd in
up) cmd_up "$@" ;;
down) cmd_down ;;
run) cmd_run "$@"; exit $? ;;
status) cmd_status ;;
mpirun) cmd_mpirun "$@"; exit $? ;;
agent) cmd_agent "$@" ;;
*)
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
    [[ -z $cmd || $cmd == -h || $cmd == --help ]] || exit 2
    ;;
esac
