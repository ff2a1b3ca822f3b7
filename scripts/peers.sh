# The MPI libraries hetccl is measured against, for scripts/compare-mpi.sh and
# scripts/compare-collectives.sh (sourced, not run):
#
#   openmpi    the system's OpenMPI (openmpi-bin, libopenmpi-dev): /usr/bin/mpirun, mpicc
#   mpich      MPICH from its PyPI wheel in $HETCCL_PEERS_DIR/mpich (scripts/install-peers.sh)
#   intelmpi   Intel MPI from its PyPI wheels in $HETCCL_PEERS_DIR/impi (scripts/install-peers.sh)
#
# MPICH and Intel MPI live in private prefixes and are called by full path, never put on
# PATH: the test suite's `mpirun` stays OpenMPI's.
#
# Links:
#   shm  OpenMPI: btl self,vader; MPICH: ch4 with its POSIX shared memory; Intel MPI:
#        I_MPI_FABRICS=shm (its intra-node collectives included).
#   tcp  OpenMPI: pml ob1, btl tcp,self; MPICH: ch4:ofi, FI_PROVIDER=tcp,
#        MPIR_CVAR_NOLOCAL=1 (local ranks through the network module too); Intel MPI:
#        I_MPI_FABRICS=ofi FI_PROVIDER=tcp I_MPI_COLL_INTRANODE=pt2pt.
# Pinning: pinned, each launcher binds rank k to core k mod C; unpinned, none binds
# (Intel MPI pins by default: I_MPI_PIN=0 turns that off).

peers_dir=${HETCCL_PEERS_DIR:-/opt/hetccl-peers}
all_peers="openmpi mpich intelmpi"

# peer_prefix NAME: where NAME's mpicc and mpiexec are (empty for the system's OpenMPI).
peer_prefix() {
    case "$1" in
        openmpi) echo "" ;;
        mpich) echo "$peers_dir/mpich" ;;
        intelmpi) echo "$peers_dir/impi" ;;
        *) echo "unknown peer '$1': need openmpi, mpich or intelmpi" >&2; return 2 ;;
    esac
}

# peer_check NAME: fails, saying how to install it, when NAME is not installed.
peer_check() {
    local p
    p=$(peer_prefix "$1") || return 2
    case "$1" in
        openmpi)
            command -v mpicc >/dev/null && command -v mpirun >/dev/null ||
                { echo "peer openmpi: mpicc/mpirun not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; return 1; } ;;
        *)
            [ -x "$p/bin/mpicc" ] && [ -x "$p/bin/mpiexec.hydra" ] ||
                { echo "peer $1: $p/bin/mpicc or mpiexec.hydra missing (run scripts/install-peers.sh $1)" >&2; return 1; } ;;
    esac
}

# peer_build NAME SRC OUT: compiles SRC against NAME's MPI.
peer_build() {
    local p
    p=$(peer_prefix "$1") || return 2
    case "$1" in
        openmpi) mpicc -O2 -o "$3" "$2" ;;
        mpich) "$p/bin/mpicc" -O2 -o "$3" "$2" -Wl,-rpath,"$p/lib" ;;
        intelmpi) I_MPI_ROOT=$p "$p/bin/mpicc" -O2 -o "$3" "$2" -Wl,-rpath,"$p/lib" ;;
    esac
}

# peer_launch NAME N LINK PIN: sets the array peer_cmd to the launch command (and the
# environment through `env`) for N ranks over LINK (shm|tcp), pinned when PIN is 1. The
# program and its arguments follow it.
peer_launch() {
    local name=$1 n=$2 link=$3 pin=$4 p
    p=$(peer_prefix "$name") || return 2
    case "$name" in
        openmpi)
            peer_cmd=(mpirun --allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo
                --mca oob_tcp_if_include lo -n "$n")
            if [ "$link" = tcp ]; then peer_cmd+=(--mca pml ob1 --mca btl tcp,self); else peer_cmd+=(--mca btl self,vader); fi
            if [ "$pin" = 1 ]; then peer_cmd+=(--bind-to core:overload-allowed); else peer_cmd+=(--bind-to none); fi
            ;;
        mpich)
            peer_cmd=(env)
            if [ "$link" = tcp ]; then peer_cmd+=(MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp MPIR_CVAR_NOLOCAL=1); fi
            peer_cmd+=("$p/bin/mpiexec.hydra" -n "$n")
            if [ "$pin" = 1 ]; then peer_cmd+=(-bind-to core); else peer_cmd+=(-bind-to none); fi
            ;;
        intelmpi)
            peer_cmd=(env I_MPI_ROOT="$p" LD_LIBRARY_PATH="$p/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
            if [ "$link" = tcp ]; then
                peer_cmd+=(I_MPI_FABRICS=ofi FI_PROVIDER=tcp I_MPI_COLL_INTRANODE=pt2pt)
            else
                peer_cmd+=(I_MPI_FABRICS=shm)
            fi
            if [ "$pin" = 1 ]; then
                local cpus k list=""
                cpus=$(nproc)
                for k in $(seq 0 $((n - 1))); do list+="${list:+,}$((k % cpus))"; done
                peer_cmd+=(I_MPI_PIN=1 I_MPI_PIN_PROCESSOR_LIST="$list")
            else
                peer_cmd+=(I_MPI_PIN=0)
            fi
            peer_cmd+=("$p/bin/mpiexec.hydra" -n "$n")
            ;;
    esac
}

# peer_list ARG: the peers ARG names ("all", or names separated by commas or spaces),
# each checked to be known.
peer_list() {
    local list=${1//,/ } q
    if [ "$list" = all ]; then list=$all_peers; fi
    for q in $list; do peer_prefix "$q" >/dev/null || return 2; done
    echo "$list"
}
