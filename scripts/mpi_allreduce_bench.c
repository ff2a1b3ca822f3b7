/*
 * Reference numbers for scripts/compare-mpi.sh and scripts/compare-collectives.sh, built
 * with whichever MPI's mpicc (OpenMPI, MPICH, Intel MPI: scripts/peers.sh).
 *
 *   mpirun -n 2 mpi_allreduce_bench -b 4 -e 256M -f 4 -n 20 -w 5 [-g COLLECTIVE]
 *       MPI_Allreduce (or -g reduce_scatter, all_gather, broadcast, reduce), float sum,
 *       separate send and receive buffers (like hetccl-perf's out-of-place column;
 *       broadcast has only the in-place form). size is the largest buffer of the call,
 *       as in hetccl-perf and nccl-tests: reduce-scatter's input, all-gather's output.
 *       Every iteration is timed on its own; time_us is the median over iterations of
 *       the slowest rank's time, mean_us the slowest rank's mean (hetccl-perf's
 *       definition, as in nccl-tests); busbw uses nccl-tests' bus factor.
 *   mpi_allreduce_bench --memcpy -b 4 -e 256M -f 4 -n 20
 *       single-thread memcpy of each size, no MPI: the memory-bandwidth ceiling.
 *
 * One line per size on stdout, key=value, for awk:
 *   mpi_allreduce coll=all_reduce ranks=2 size=1048576 count=262144 time_us=812.10 mean_us=840.31 algbw=1.2912 busbw=1.2912 wrong=0
 *   memcpy size=1048576 time_us=90.12 gbps=11.6354
 * and at the end (MPI only) "max_rss_kib=N", the largest peak RSS over ranks.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <time.h>

static size_t parse_size(const char *s) {
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    default: break;
    }
    return (size_t)v;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

enum coll { ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER, BROADCAST, REDUCE };
static const char *coll_names[] = {"all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce"};

/* One call of `c` on `count` floats (the largest buffer); n ranks. */
static void run_coll(enum coll c, float *send, float *recv, size_t count, int n) {
    int part = (int)(count / (size_t)n);
    switch (c) {
    case ALL_REDUCE: MPI_Allreduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); break;
    case REDUCE_SCATTER: MPI_Reduce_scatter_block(send, recv, part, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); break;
    case ALL_GATHER: MPI_Allgather(send, part, MPI_FLOAT, recv, part, MPI_FLOAT, MPI_COMM_WORLD); break;
    case BROADCAST: MPI_Bcast(recv, (int)count, MPI_FLOAT, 0, MPI_COMM_WORLD); break;
    case REDUCE: MPI_Reduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD); break;
    }
}

/* Input element i of rank r: small integers, so every sum is exact and checked bitwise. */
static float input(int r, size_t i) { return (float)(1 + ((size_t)r + i) % 3); }

/* Wrong elements of this rank's output after one call of `c`. */
static long count_wrong(enum coll c, const float *recv, size_t count, int rank, int n) {
    size_t part = count / (size_t)n, len = count;
    long wrong = 0;
    if (c == REDUCE_SCATTER) len = part;
    if (c == ALL_GATHER) len = part * (size_t)n;
    if (c == REDUCE && rank != 0) return 0;
    for (size_t k = 0; k < len; k++) {
        float want = 0.0f;
        switch (c) {
        case ALL_REDUCE: case REDUCE:
            for (int r = 0; r < n; r++) want += input(r, k);
            break;
        case REDUCE_SCATTER:
            for (int r = 0; r < n; r++) want += input(r, (size_t)rank * part + k);
            break;
        case ALL_GATHER: want = input((int)(k / part), k % part); break;
        case BROADCAST: want = input(0, k); break;
        }
        wrong += recv[k] != want;
    }
    return wrong;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void run_memcpy(size_t minb, size_t maxb, size_t f, int iters, int warmup) {
    char *src = malloc(maxb), *dst = malloc(maxb);
    double *t = malloc(sizeof(double) * (size_t)iters);
    if (!src || !dst || !t) { fprintf(stderr, "out of memory\n"); exit(1); }
    memset(src, 1, maxb);
    memset(dst, 0, maxb);  /* fault the pages in before timing */
    for (size_t s = minb; s <= maxb; s *= f) {
        for (int i = 0; i < warmup; i++) memcpy(dst, src, s);
        for (int i = 0; i < iters; i++) {
            double t0 = now_s();
            memcpy(dst, src, s);
            t[i] = now_s() - t0;
            /* keep the copy observable so it cannot be dropped */
            __asm__ volatile("" : : "r"(dst) : "memory");
        }
        double med = median(t, iters);
        printf("memcpy size=%zu time_us=%.3f gbps=%.4f\n", s, med * 1e6, (double)s / med / 1e9);
        if (f < 2) break;
    }
    free(src); free(dst); free(t);
}

int main(int argc, char **argv) {
    size_t minb = 4, maxb = 256u << 20, f = 4;
    int iters = 20, warmup = 5, memcpy_mode = 0;
    enum coll coll = ALL_REDUCE;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--memcpy")) { memcpy_mode = 1; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "%s needs a value\n", argv[i]); return 2; }
        if (!strcmp(argv[i], "-b")) minb = parse_size(argv[++i]);
        else if (!strcmp(argv[i], "-e")) maxb = parse_size(argv[++i]);
        else if (!strcmp(argv[i], "-f")) f = parse_size(argv[++i]);
        else if (!strcmp(argv[i], "-n")) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-w")) warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-g")) {
            const char *g = argv[++i];
            int found = 0;
            for (int k = 0; k < 5; k++)
                if (!strcmp(g, coll_names[k])) { coll = (enum coll)k; found = 1; }
            if (!found) {
                fprintf(stderr, "-g %s: need all_reduce, reduce_scatter, all_gather, broadcast or reduce\n", g);
                return 2;
            }
        }
        else { fprintf(stderr, "unknown flag %s\n", argv[i]); return 2; }
    }
    if (minb == 0 || iters < 1) { fprintf(stderr, "need -b >= 1 and -n >= 1\n"); return 2; }
    if (memcpy_mode) { run_memcpy(minb, maxb, f, iters, warmup); return 0; }

    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    size_t maxc = maxb / sizeof(float);
    float *send = malloc(maxc * sizeof(float) + 1), *recv = malloc(maxc * sizeof(float) + 1);
    double *t = malloc(sizeof(double) * (size_t)iters), *tmax = malloc(sizeof(double) * (size_t)iters);
    if (!send || !recv || !t || !tmax) { fprintf(stderr, "out of memory\n"); MPI_Abort(MPI_COMM_WORLD, 1); }
    for (size_t i = 0; i < maxc; i++) { send[i] = input(rank, i); recv[i] = 0.0f; }
    for (size_t s = minb; s <= maxb; s *= f) {
        /* Collectives that split the buffer among ranks need a multiple of n elements. */
        size_t count = s / sizeof(float);
        if (coll == REDUCE_SCATTER || coll == ALL_GATHER) count -= count % (size_t)n;
        if (count > 0) {
            /* Broadcast is in place: the root's buffer holds its input before every call. */
            if (coll == BROADCAST && rank == 0) memcpy(recv, send, count * sizeof(float));
            for (int i = 0; i < warmup; i++) run_coll(coll, send, recv, count, n);
            MPI_Barrier(MPI_COMM_WORLD);
            for (int i = 0; i < iters; i++) {
                double t0 = MPI_Wtime();
                run_coll(coll, send, recv, count, n);
                t[i] = MPI_Wtime() - t0;
            }
            MPI_Allreduce(t, tmax, iters, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            double sum = 0.0, mean = 0.0;
            for (int i = 0; i < iters; i++) sum += t[i];
            sum /= iters;
            MPI_Allreduce(&sum, &mean, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            long wrong = count_wrong(coll, recv, count, rank, n), total = 0;
            MPI_Reduce(&wrong, &total, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
            double med = median(tmax, iters);
            double bytes = (double)(count * sizeof(float));
            double algbw = bytes / med / 1e9;
            double factor = coll == ALL_REDUCE ? 2.0 * (n - 1) / n
                          : (coll == REDUCE_SCATTER || coll == ALL_GATHER) ? (double)(n - 1) / n : 1.0;
            double busbw = algbw * factor;
            if (rank == 0)
                printf("mpi_allreduce coll=%s ranks=%d size=%zu count=%zu time_us=%.2f mean_us=%.2f algbw=%.4f "
                       "busbw=%.4f wrong=%ld\n",
                       coll_names[coll], n, count * sizeof(float), count, med * 1e6, mean * 1e6, algbw, busbw, total);
            fflush(stdout);
        }
        if (f < 2) break;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long rss = ru.ru_maxrss, maxrss = 0;
    MPI_Reduce(&rss, &maxrss, 1, MPI_LONG, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank == 0) printf("max_rss_kib=%ld\n", maxrss);
    free(send); free(recv); free(t); free(tmax);
    MPI_Finalize();
    return 0;
}
