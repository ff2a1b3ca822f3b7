#!/usr/bin/env bash
# Installs the MPI libraries that scripts/compare-mpi.sh and compare-collectives.sh
# measure hetccl against, each from its PyPI wheels into a private virtual environment:
#
#   scripts/install-peers.sh [intelmpi] [mpich]      # default: both
#
#   intelmpi  impi-rt + impi-devel  -> $HETCCL_PEERS_DIR/impi  (mpicc, mpiexec.hydra)
#   mpich     mpich                 -> $HETCCL_PEERS_DIR/mpich (mpicc, mpiexec.hydra)
#
# HETCCL_PEERS_DIR defaults to /opt/hetccl-peers. OpenMPI, the third peer, is the
# system's (openmpi-bin, libopenmpi-dev). Nothing is put on PATH: Debian's mpich package
# would register its mpirun and mpicc as alternatives beside OpenMPI's, and Intel MPI
# ships a `mpirun` of its own, while the test suite runs whatever `mpirun` PATH finds and
# must keep getting OpenMPI's. The script checks that `mpirun` resolves to the same file
# before and after, and fails if it does not. Each peer is then run with 2 and 4 ranks
# over shared memory and TCP (a one-float all-reduce) to show that it works here.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/peers.sh
. "$here/peers.sh"

want=${*:-intelmpi mpich}
python=${PYTHON:-python3}

mpirun_of() { if command -v mpirun >/dev/null; then readlink -f "$(command -v mpirun)"; else echo none; fi; }
before=$(mpirun_of)

for peer in $want; do
    case "$peer" in
        intelmpi) pkgs=(impi-rt impi-devel) ;;
        mpich) pkgs=(mpich) ;;
        *) echo "install-peers.sh: unknown peer '$peer': need intelmpi or mpich (openmpi is the system's)" >&2; exit 2 ;;
    esac
    prefix=$(peer_prefix "$peer")
    if [ ! -x "$prefix/bin/pip" ]; then
        echo "# $peer: virtual environment $prefix" >&2
        "$python" -m venv "$prefix"
    fi
    echo "# $peer: pip install ${pkgs[*]}" >&2
    "$prefix/bin/pip" install --quiet --disable-pip-version-check "${pkgs[@]}"
done

after=$(mpirun_of)
if [ "$before" != "$after" ]; then
    echo "install-peers.sh: mpirun on PATH changed from $before to $after; the test suite needs OpenMPI's" >&2
    exit 1
fi
echo "# mpirun on PATH: $after (unchanged)" >&2

# A one-float all-reduce on 2 and 4 ranks, shared memory and TCP: the sum of ranks + 1.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/hello.c" <<'EOF'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int rank, n, len;
    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    MPI_Get_library_version(lib, &len);
    for (int i = 0; i < len; i++) if (lib[i] == '\n') { lib[i] = 0; break; }
    float x = (float)(rank + 1), y = 0;
    MPI_Allreduce(&x, &y, 1, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf("ranks=%d sum=%g want=%d %s\n", n, y, n * (n + 1) / 2, lib);
    MPI_Finalize();
    return y == (float)(n * (n + 1) / 2) ? 0 : 1;
}
EOF
for peer in $want; do
    peer_check "$peer"
    peer_build "$peer" "$work/hello.c" "$work/hello.$peer"
    for link in shm tcp; do
        for n in 2 4; do
            peer_launch "$peer" "$n" "$link" 0
            printf '%s %s: ' "$peer" "$link"
            timeout 120 "${peer_cmd[@]}" "$work/hello.$peer"
        done
    done
done
