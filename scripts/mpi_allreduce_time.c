/* MPI_Allreduce timing twin of examples/allreduce_time.rs, for side-by-side numbers:
 * an in-place f32 sum of BYTES, ITERS timed calls after one untimed one, each after a
 * barrier and counted as the slowest rank's time, result checked against its closed form.
 *
 *   mpicc -O2 -o mpi_allreduce_time scripts/mpi_allreduce_time.c
 *   scripts/netcluster.sh mpirun --ranks 2,2 -- ./mpi_allreduce_time 67108864 3
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n; MPI_Comm_rank(MPI_COMM_WORLD, &rank); MPI_Comm_size(MPI_COMM_WORLD, &n);
    size_t bytes = argc > 1 ? strtoull(argv[1], 0, 10) : (64u << 20);
    int iters = argc > 2 ? atoi(argv[2]) : 3;
    size_t count = bytes / 4;
    float *b = malloc(bytes);
    for (int it = 0; it <= iters; it++) {
        for (size_t i = 0; i < count; i++) b[i] = rank + i % 3;
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        MPI_Allreduce(MPI_IN_PLACE, b, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double dt = MPI_Wtime() - t0, mx;
        MPI_Allreduce(&dt, &mx, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        for (size_t i = 0; i < count; i++) if (b[i] != (float)(n*(n-1)/2 + n*(i%3))) { fprintf(stderr, "wrong at %zu\n", i); return 1; }
        if (rank == 0 && it > 0) printf("iteration %d: %.4f s\n", it, mx);
    }
    MPI_Finalize();
    return 0;
}
